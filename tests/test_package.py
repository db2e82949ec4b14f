"""The package as a whole: layout, import boundaries, lint, launch file, console script."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROS_TOP_LEVEL = {
    "rclpy", "rcl", "rcutils", "rmw", "rosidl_runtime_py", "rosidl_parser", "orcnn_ros",
    "sensor_msgs", "std_msgs", "builtin_interfaces", "diagnostic_msgs", "lifecycle_msgs",
    "geometry_msgs", "ament_index_python", "launch", "launch_ros", "cv_bridge",
}


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    # Run from a folder outside the repository: the source tree must not be on sys.path.
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=kwargs.pop("cwd", "/"), timeout=300, **kwargs)


def test_orcnn_core_imports_no_ros_module():
    result = run_python(f"""
        import importlib, pkgutil, sys
        import orcnn_core
        for mod in pkgutil.walk_packages(orcnn_core.__path__, "orcnn_core."):
            importlib.import_module(mod.name)
        ros = sorted(m for m in sys.modules if m.split(".")[0] in {sorted(ROS_TOP_LEVEL)!r})
        print("ROS:", ros)
        print("MODULES:", sum(m.startswith("orcnn_core") for m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert "ROS: []" in result.stdout, result.stdout
    # The walk must have imported more than the package itself.
    assert int(result.stdout.split("MODULES:")[1]) >= 3, result.stdout


def test_installed_messages_are_not_shadowed_by_the_source_tree():
    import orcnn_ros
    import orcnn_ros.msg

    package_dir = Path(orcnn_ros.__file__).parent
    assert package_dir != ROOT / "orcnn_ros", (
        f"orcnn_ros imported from the source tree {package_dir}: the generated "
        "orcnn_ros.msg is hidden (run tests with `pytest`, not `python -m pytest`)")
    assert (package_dir / "msg").is_dir()
    assert {"AmodalInstance", "AmodalInstanceArray", "OcclusionEdge"} <= set(
        dir(orcnn_ros.msg))


def test_message_definitions_match_the_public_api():
    """Field names and types of the built messages are the documented public API."""
    from orcnn_ros.msg import AmodalInstance, AmodalInstanceArray, OcclusionEdge

    assert AmodalInstance.get_fields_and_field_types() == {
        "id": "uint32", "class_id": "int32", "class_name": "string", "score": "float",
        "roi_x": "int32", "roi_y": "int32", "roi_width": "uint32", "roi_height": "uint32",
        "mask": "sensor_msgs/Image", "amodal_area": "uint32", "visible_area": "uint32",
        "occlusion_ratio": "float", "truncated": "boolean", "layer": "uint32",
        "free_probability": "float"}
    assert OcclusionEdge.get_fields_and_field_types() == {
        "occluder": "uint32", "occludee": "uint32", "overlap_pixels": "uint32",
        "overlap_ratio": "float", "confidence": "float"}
    assert AmodalInstanceArray.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "image_width": "uint32", "image_height": "uint32",
        "instances": "sequence<orcnn_ros/AmodalInstance>",
        "edges": "sequence<orcnn_ros/OcclusionEdge>", "pick_order": "sequence<uint32>",
        "has_cycle": "boolean", "model_name": "string", "inference_ms": "float",
        "latency_ms": "float"}


def test_package_manifest_is_valid():
    catkin_pkg = pytest.importorskip("catkin_pkg.package")
    package = catkin_pkg.parse_package(str(ROOT / "package.xml"))
    package.validate()
    assert package.name == "orcnn_ros"
    assert package.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in [g.name for g in package.member_of_groups]


def test_flake8_at_99_columns():
    result = subprocess.run([sys.executable, "-m", "flake8", "--max-line-length", "99", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launch_file_loads():
    try:
        import launch  # noqa: F401
        from launch.actions import DeclareLaunchArgument
        from launch.launch_description_sources import PythonLaunchDescriptionSource
        from launch_ros.actions import LifecycleNode, Node
    except ImportError as exc:
        pytest.skip(f"ROS 2 'launch'/'launch_ros' not importable here ({exc}); "
                    "the launch file is checked on a ROS 2 distribution")
    source = PythonLaunchDescriptionSource(str(ROOT / "launch" / "perception.launch.py"))
    description = source.try_get_launch_description_without_context()
    nodes = [e for e in description.entities if isinstance(e, Node)]
    assert len(nodes) == 1 and isinstance(nodes[0], LifecycleNode)
    assert nodes[0].node_package == "orcnn_ros"
    assert nodes[0].node_executable == "perception_node"
    arguments = {e.name: e for e in description.entities
                 if isinstance(e, DeclareLaunchArgument)}
    # A boolean with choices: launch itself refuses other values, nothing is evaluated.
    assert arguments["use_compressed"].choices == ["true", "false"]
    source_text = (ROOT / "launch" / "perception.launch.py").read_text()
    assert "PythonExpression" not in source_text


def test_params_file_applies_in_any_namespace_and_names_only_node_parameters():
    import yaml
    from orcnn_ros.perception_node import PARAMETERS

    config = yaml.safe_load((ROOT / "config" / "perception.yaml").read_text())
    assert list(config) == ["/**/orcnn_perception"]
    values = config["/**/orcnn_perception"]["ros__parameters"]
    assert set(values) == set(PARAMETERS)
    for name, value in values.items():
        assert value == PARAMETERS[name][0], name


def test_every_executable_is_installed_and_answers_help():
    """`ros2 run orcnn_ros X` runs lib/orcnn_ros/X; each one prints its usage for --help."""
    from ament_index_python.packages import get_package_prefix

    lib = Path(get_package_prefix("orcnn_ros")) / "lib" / "orcnn_ros"
    names = ("perception_node", "sim_camera", "bag_infer", "demo")
    for name in names:
        assert (ROOT / "scripts" / name).is_file(), name
        assert (lib / name).is_file() and os.access(lib / name, os.X_OK), \
            f"{lib / name} missing: run make setup"
        result = subprocess.run([str(lib / name), "--help"], capture_output=True, text=True,
                                timeout=120, cwd="/")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("usage:"), (name, result.stdout)


def test_console_script_runs():
    result = subprocess.run(["orcnn-core", "--version"], capture_output=True, text=True,
                            timeout=120, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("orcnn-core ")
    result = subprocess.run(["orcnn-core"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2


def test_setup_is_idempotent():
    """A second set-up on a ready checkout skips every step and takes seconds."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Python packages up to date" in result.stdout, result.stdout
    assert "colcon build up to date" in result.stdout, result.stdout
