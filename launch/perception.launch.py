"""Start the ORCNN amodal perception node (lifecycle node ``orcnn_perception``).

    ros2 launch orcnn_ros perception.launch.py image_topic:=/camera/color/image_raw
    ros2 launch orcnn_ros perception.launch.py namespace:=robot1 use_compressed:=true \\
        model_path:=/path/to/model.safetensors params_file:=/path/to/my_params.yaml

Arguments (``ros2 launch orcnn_ros perception.launch.py --show-args``):
    image_topic     camera topic; with use_compressed:=true the node subscribes to
                    <image_topic>/compressed (sensor_msgs/CompressedImage)
    params_file     node parameters (default: the installed config/perception.yaml); a file
                    that does not exist fails the launch
    model_path      ORCNN weights (.safetensors); empty: the params file's model_path (empty
                    there too: the bundled model)
    namespace       namespace of the node; outputs become /<namespace>/amodal_instances
    use_compressed  true or false; overrides the params file's value
    autostart       true: the node configures and activates itself; false: it waits
                    unconfigured for `ros2 lifecycle set`; empty (default): the params
                    file's autostart, true when it has none
emulate_tty:=true (read by launch itself) runs the node on a pseudo-terminal, for coloured
log lines; by default it is off, so log files hold no colour codes.

The node configures and activates itself when its parameter autostart is true (the
default; autostart:=false to drive it with `ros2 lifecycle set`). When that configure
fails (e.g. a bad model file), the node process ends with exit status 1 and an error naming
the file, unless its parameter exit_on_configure_failure is false.
"""

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription, Substitution
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue

NODE_NAME = "orcnn_perception"


class LaunchArgumentError(RuntimeError):
    """A launch argument names something unusable; launch reports the message and fails."""


def check_params_file(context):
    """Fail the launch, naming the file, when params_file is not a file."""
    path = LaunchConfiguration("params_file").perform(context)
    if not os.path.isfile(path):
        raise LaunchArgumentError(
            f"params_file '{path}' does not exist (or is not a file): pass "
            f"params_file:=<YAML file with {NODE_NAME} parameters>, or leave it out for the "
            f"installed config/perception.yaml")
    return []


class ArgumentOrParamsFile(Substitution):
    """The launch argument ``name`` when it is not empty, else the params file's value of
    the node parameter ``name`` (the last section that applies to this node), else
    ``default``. Booleans come out as 'true' / 'false'."""

    def __init__(self, name: str, default: str = ""):
        super().__init__()
        self.name, self.default = name, default

    def describe(self) -> str:
        return f"{self.name} argument, else the params file's {self.name}"

    def perform(self, context) -> str:
        given = LaunchConfiguration(self.name).perform(context)
        if given:
            return given
        try:
            with open(LaunchConfiguration("params_file").perform(context),
                      encoding="utf-8") as f:
                sections = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError):
            return self.default  # check_params_file reports a missing file; the node a bad one
        value = None
        for key, section in sections.items() if isinstance(sections, dict) else ():
            if str(key).rstrip("/").split("/")[-1] in (NODE_NAME, "*", "**") \
                    and isinstance(section, dict):
                value = (section.get("ros__parameters") or {}).get(self.name, value)
        if value is None or value == "":
            return self.default
        return str(value).lower() if isinstance(value, bool) else str(value)


def generate_launch_description():
    default_params = os.path.join(
        get_package_share_directory("orcnn_ros"), "config", "perception.yaml")
    image_topic = LaunchConfiguration("image_topic")
    overrides = {
        "model_path": ArgumentOrParamsFile("model_path"),
        # A typed bool for the node's boolean parameter; the argument's choices admit only
        # 'true' and 'false'.
        "use_compressed": ParameterValue(LaunchConfiguration("use_compressed"),
                                         value_type=bool),
        "autostart": ParameterValue(ArgumentOrParamsFile("autostart", "true"),
                                    value_type=bool),
    }
    return LaunchDescription([
        DeclareLaunchArgument(
            "image_topic", default_value="image",
            description="camera image topic (sensor_msgs/Image)"),
        DeclareLaunchArgument(
            "params_file", default_value=default_params,
            description="YAML file with the orcnn_perception node's parameters"),
        DeclareLaunchArgument(
            "model_path", default_value="",
            description="ORCNN weights file (.safetensors); empty: the params file's "
                        "model_path (empty there too: the bundled model)"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="namespace of the node and its output topics"),
        DeclareLaunchArgument(
            "use_compressed", default_value="false", choices=["true", "false"],
            description="subscribe to <image_topic>/compressed (CompressedImage)"),
        DeclareLaunchArgument(
            "autostart", default_value="", choices=["true", "false", ""],
            description="configure and activate the node at start; false: wait for "
                        "`ros2 lifecycle set`; empty: the params file's autostart "
                        "(default true)"),
        OpaqueFunction(function=check_params_file),
        LifecycleNode(
            package="orcnn_ros",
            executable="perception_node",
            name=NODE_NAME,
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), overrides],
            remappings=[
                ("image", image_topic),
                ("image/compressed", [image_topic, "/compressed"]),
            ],
            output="screen",
            # emulate_tty: off unless the launch configuration emulate_tty says true.
        ),
    ])
