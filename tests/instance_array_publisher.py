"""Publish one AmodalInstanceArray, described by a JSON file, until terminated.

Run by the message round-trip test as a separate process:
    python instance_array_publisher.py SPEC.json TOPIC
"""

import json
import sys

import rclpy
from orcnn_ros.msg import AmodalInstance, AmodalInstanceArray, OcclusionEdge
from sensor_msgs.msg import Image


def build_message(spec: dict) -> AmodalInstanceArray:
    msg = AmodalInstanceArray()
    msg.header.stamp.sec = spec["stamp"][0]
    msg.header.stamp.nanosec = spec["stamp"][1]
    msg.header.frame_id = spec["frame_id"]
    msg.image_width = spec["image_width"]
    msg.image_height = spec["image_height"]
    for inst in spec["instances"]:
        m = AmodalInstance()
        for key in ("id", "class_id", "class_name", "score", "roi_x", "roi_y", "roi_width",
                    "roi_height", "amodal_area", "visible_area", "occlusion_ratio",
                    "truncated", "layer"):
            setattr(m, key, inst[key])
        m.mask = Image(height=inst["roi_height"], width=inst["roi_width"], encoding="mono8",
                       is_bigendian=0, step=inst["roi_width"], data=bytes(inst["mask"]))
        m.mask.header = msg.header
        msg.instances.append(m)
    for edge in spec["edges"]:
        msg.edges.append(OcclusionEdge(**edge))
    msg.pick_order = spec["pick_order"]
    msg.has_cycle = spec["has_cycle"]
    msg.model_name = spec["model_name"]
    msg.inference_ms = spec["inference_ms"]
    msg.latency_ms = spec["latency_ms"]
    return msg


def main() -> None:
    spec_path, topic = sys.argv[1], sys.argv[2]
    with open(spec_path, encoding="utf-8") as f:
        msg = build_message(json.load(f))
    rclpy.init()
    node = rclpy.create_node("instance_array_publisher")
    pub = node.create_publisher(AmodalInstanceArray, topic, 10)
    node.create_timer(0.1, lambda: pub.publish(msg))
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
