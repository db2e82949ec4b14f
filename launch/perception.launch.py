"""Start the ORCNN amodal perception node with the parameters in config/perception.yaml.

    ros2 launch orcnn_ros perception.launch.py [params_file:=...] [image:=/camera/image_raw]
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(
        get_package_share_directory("orcnn_ros"), "config", "perception.yaml")
    return LaunchDescription([
        DeclareLaunchArgument(
            "params_file", default_value=default_params,
            description="YAML file with the orcnn_perception node's parameters"),
        DeclareLaunchArgument(
            "image", default_value="image",
            description="Camera image topic to subscribe to"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="Namespace for the node and its output topics"),
        Node(
            package="orcnn_ros",
            executable="perception_node",
            name="orcnn_perception",
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file")],
            remappings=[
                ("image", LaunchConfiguration("image")),
                ("image/compressed", [LaunchConfiguration("image"), "/compressed"]),
            ],
            output="screen",
            emulate_tty=True,
        ),
    ])
