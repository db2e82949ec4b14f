"""Start the ORCNN amodal perception node with the parameters in config/perception.yaml.

    ros2 launch orcnn_ros perception.launch.py image_topic:=/camera/color/image_raw
    ros2 launch orcnn_ros perception.launch.py use_compressed:=true model_path:=/m.safetensors

Arguments:
    image_topic     camera topic; with use_compressed:=true the node subscribes to
                    <image_topic>/compressed (sensor_msgs/CompressedImage)
    params_file     node parameters (default: the installed config/perception.yaml)
    model_path      ORCNN weights (.safetensors); empty: the bundled model
    namespace       namespace of the node; outputs become /<namespace>/amodal_instances
    use_compressed  true / false
model_path and use_compressed are passed after params_file, so they override its values.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(
        get_package_share_directory("orcnn_ros"), "config", "perception.yaml")
    image_topic = LaunchConfiguration("image_topic")
    overrides = {
        "model_path": LaunchConfiguration("model_path"),
        # A real bool: the node's parameter is typed.
        "use_compressed": PythonExpression(
            ["'", LaunchConfiguration("use_compressed"), "'.strip().lower() in ('true', '1')"]),
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
            description="ORCNN weights file (.safetensors); empty: the bundled model"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="namespace of the node and its output topics"),
        DeclareLaunchArgument(
            "use_compressed", default_value="false",
            description="subscribe to <image_topic>/compressed (CompressedImage)"),
        Node(
            package="orcnn_ros",
            executable="perception_node",
            name="orcnn_perception",
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), overrides],
            remappings=[
                ("image", image_topic),
                ("image/compressed", [image_topic, "/compressed"]),
            ],
            output="screen",
            emulate_tty=True,
        ),
    ])
