"""Run the model over the images of a rosbag2 and write the results to a new rosbag2.

    python -m orcnn_ros.bag_infer --bag IN --topic /camera/image_raw --out OUT

No ROS tools and no running ROS graph: ``rosbags`` reads and writes the bags (sqlite3 or
mcap), the Predictor runs in this process. Input messages are sensor_msgs/Image or
CompressedImage; the output bag holds, at each input message's time stamp, one
``orcnn_ros/msg/AmodalInstanceArray`` (the perception node's message, built by the same
code) and, unless ``--no-overlay``, the overlay as sensor_msgs/Image. The output types are
registered in the bag from this package's ``.msg`` files, so any rosbag2 reader can decode
them. A frame that cannot be converted (malformed, or beyond the image size limits of
:mod:`orcnn_core.imageio`) or whose inference fails is skipped with a line and counted; the
output bag is finalised even when the run stops early (an error, Ctrl-C: exit status 130),
holding the results of the frames before.
"""

import importlib.util
import os
import sys

if __name__ == "__main__" and not sys.flags.safe_path \
        and importlib.util.find_spec("orcnn_ros.msg") is None:  # pragma: no cover
    # Started from the repository root, where the source folder shadows the built package.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "orcnn_ros.bag_infer",
                              *sys.argv[1:]])

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from rclpy.serialization import serialize_message  # noqa: E402
from rosbags.rosbag2 import Reader, Writer  # noqa: E402
from rosbags.typesys import Stores, get_types_from_msg, get_typestore  # noqa: E402

from orcnn_core.errors import InputError  # noqa: E402
from orcnn_core.occlusion import (MIN_CONFIDENCE, MIN_OVERLAP_PIXELS,  # noqa: E402
                                  MIN_OVERLAP_RATIO, occlusion_graph)
from orcnn_core.visualize import draw_prediction  # noqa: E402
from orcnn_ros import conversions  # noqa: E402
from orcnn_ros.perception_node import default_model_path  # noqa: E402

__all__ = ["msg_dir", "make_typestore", "infer_bag", "main"]

OUTPUT_TYPE = "orcnn_ros/msg/AmodalInstanceArray"
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


def msg_dir() -> Path:
    """Folder with this package's .msg files: the installed share folder, else the source
    tree's msg/."""
    try:
        from ament_index_python.packages import get_package_share_directory

        path = Path(get_package_share_directory("orcnn_ros")) / "msg"
        if path.is_dir():
            return path
    except Exception:  # not installed through ament
        pass
    return Path(__file__).resolve().parents[1] / "msg"


def make_typestore():
    """A rosbags typestore (ROS 2 Kilted, or the newest the installed rosbags knows) with
    the orcnn_ros messages registered from their .msg files."""
    store = get_typestore(getattr(Stores, "ROS2_KILTED", Stores.LATEST))
    types = {}
    for path in sorted(msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(encoding="utf-8"),
                                        f"orcnn_ros/msg/{path.stem}"))
    if OUTPUT_TYPE not in types:
        raise FileNotFoundError(f"no AmodalInstanceArray.msg in {msg_dir()}")
    store.register(types)
    return store


@dataclass
class _Output:
    """Where and how the results of one run go."""

    writer: Writer
    store: object
    results: object  # the AmodalInstanceArray connection
    overlays: object  # the overlay connection, or None
    settings: dict  # score_threshold, max_instances, min_*, color_order, model_name
    summary: dict
    log: object


def infer_bag(bag, topic, out, predictor, *, score_threshold=0.5, max_instances=50,
              min_overlap_pixels=MIN_OVERLAP_PIXELS, min_overlap_ratio=MIN_OVERLAP_RATIO,
              min_edge_confidence=MIN_CONFIDENCE, color_order="auto",
              output_topic="/amodal_instances",
              overlay_topic="/orcnn_perception/debug_image", model_name="", limit=0,
              log=print) -> dict:
    """Process ``topic`` of ``bag`` into a new bag ``out``; returns a summary dict.

    A frame that cannot be converted (``malformed``: e.g. beyond the image size limits) or
    whose inference fails (``failed``) is skipped with a line to ``log`` and counted. The
    output bag is finalised (index and metadata written, readable by any rosbag2 reader)
    whatever ends the run: the frames before an error or a Ctrl-C keep their results.
    Raises ValueError for a missing topic or one that holds no images.
    """
    store = make_typestore()
    summary = dict(frames=0, malformed=0, failed=0, instances=0, inference_ms=0.0,
                   output=str(out))
    settings = dict(score_threshold=score_threshold, max_instances=max_instances,
                    min_overlap_pixels=min_overlap_pixels, min_overlap_ratio=min_overlap_ratio,
                    min_edge_confidence=min_edge_confidence, color_order=color_order,
                    model_name=model_name)
    with Reader(bag) as reader:
        connections = _image_connections(reader, bag, topic)
        writer = Writer(out, version=Writer.VERSION_LATEST)
        writer.open()
        try:
            output = _Output(writer, store, writer.add_connection(
                output_topic, OUTPUT_TYPE, typestore=store), None, settings, summary, log)
            if overlay_topic:
                output.overlays = writer.add_connection(overlay_topic, "sensor_msgs/msg/Image",
                                                        typestore=store)
            for connection, timestamp, raw in reader.messages(connections=connections):
                if limit and summary["frames"] >= limit:
                    break
                _infer_frame(predictor, store.deserialize_cdr(raw, connection.msgtype),
                             timestamp, output)
        except BaseException as exc:
            log(f"stopped after {summary['frames']} frames ({type(exc).__name__}: {exc}); "
                f"{out} holds their results")
            raise
        finally:
            writer.close()  # not abort(): what was written stays readable
    if summary["frames"]:
        summary["inference_ms"] /= summary["frames"]
    return summary


def _infer_frame(predictor, msg, timestamp: int, output: _Output) -> None:
    """Run one bag message through the model and write its results; a bad frame is
    logged and counted instead."""
    start = time.perf_counter()
    settings, summary = output.settings, output.summary
    try:
        image, order = conversions.message_to_array(msg, settings["color_order"])
    except ValueError as exc:
        summary["malformed"] += 1
        output.log(f"skipping malformed frame at {timestamp} ns: {exc}")
        return
    if not image.flags.writeable:  # a view of the bag's bytes; torch wants a copy
        image = image.copy()
    t0 = time.perf_counter()
    try:
        prediction = predictor(image, color_order=order)
    except Exception as exc:  # e.g. a fixed-size back-end's failed graph build
        summary["failed"] += 1
        output.log(f"skipping frame at {timestamp} ns, inference failed: "
                   f"{type(exc).__name__}: {exc}")
        return
    inference_ms = (time.perf_counter() - t0) * 1000.0
    prediction = conversions.select_instances(prediction, settings["score_threshold"],
                                              settings["max_instances"])
    graph = occlusion_graph(prediction, settings["min_overlap_pixels"],
                            settings["min_overlap_ratio"], settings["min_edge_confidence"])
    header = conversions.copy_header(msg.header)
    result = conversions.instance_array_msg(prediction, graph, header, settings["model_name"],
                                            inference_ms, (time.perf_counter() - start) * 1000.0)
    output.writer.write(output.results, timestamp, serialize_message(result))
    if output.overlays is not None:
        overlay = draw_prediction(image, prediction, graph, color_order=order)
        output.writer.write(output.overlays, timestamp, serialize_message(
            conversions.array_to_image_msg(overlay, order + "8", header)))
    summary["frames"] += 1
    summary["instances"] += len(prediction)
    summary["inference_ms"] += inference_ms
    output.log(f"frame {summary['frames']}: {len(prediction)} instances, "
               f"{len(graph.edges)} edges, pick order {graph.pick_order.tolist()[:8]}, "
               f"{inference_ms:.0f} ms")


def _image_connections(reader, bag, topic: str) -> list:
    """The connections of ``topic`` in the bag ``reader`` reads; ValueError when there is
    none or they hold something other than images."""
    connections = [c for c in reader.connections if c.topic == topic]
    if not connections:
        raise ValueError(f"{bag}: no topic {topic!r} (topics: "
                         f"{', '.join(sorted(reader.topics)) or 'none'})")
    if any(c.msgtype not in IMAGE_TYPES for c in connections):
        raise ValueError(f"{bag}: topic {topic!r} holds {connections[0].msgtype}, not "
                         f"{' or '.join(IMAGE_TYPES)}")
    return connections


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orcnn_ros.bag_infer",
        description="Amodal instance segmentation of the images in a rosbag2; writes "
                    "AmodalInstanceArray messages (and overlays) to a new rosbag2.")
    parser.add_argument("--bag", required=True, help="input rosbag2 folder")
    parser.add_argument("--topic", required=True,
                        help="image topic (sensor_msgs/Image or CompressedImage)")
    parser.add_argument("--out", required=True, help="output rosbag2 folder (must not exist)")
    parser.add_argument("--model", default="",
                        help="ORCNN weights (.safetensors); default: the bundled model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--max-instances", type=int, default=50)
    parser.add_argument("--min-overlap-pixels", type=float, default=MIN_OVERLAP_PIXELS)
    parser.add_argument("--min-overlap-ratio", type=float, default=MIN_OVERLAP_RATIO)
    parser.add_argument("--min-edge-confidence", type=float, default=MIN_CONFIDENCE)
    parser.add_argument("--color-order", default="auto", choices=("auto", "rgb", "bgr"))
    parser.add_argument("--output-topic", default="/amodal_instances")
    parser.add_argument("--overlay-topic", default="/orcnn_perception/debug_image")
    parser.add_argument("--no-overlay", action="store_true", help="write no overlay images")
    parser.add_argument("--limit", type=int, default=0, help="stop after N frames (0: all)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing, not at the top: it imports torch, which takes seconds and is
    # not needed for --help or a usage error.
    from orcnn_core.predictor import Predictor

    model = Path(args.model) if args.model else default_model_path()
    if Path(args.out).exists():
        print(f"bag_infer: {args.out} exists already; choose a new output folder",
              file=sys.stderr)
        return 2
    if not 0.0 <= args.score_threshold <= 1.0 or args.max_instances < 1:
        print("bag_infer: --score-threshold must be in [0, 1] and --max-instances >= 1",
              file=sys.stderr)
        return 2
    try:
        if not model.is_file():
            raise InputError(f"{model}: no such file" + (
                "" if args.model else " (the bundled model; pass --model)"))
        predictor = Predictor.from_file(model, device=args.device,
                                        score_thresh=args.score_threshold)
        summary = infer_bag(
            args.bag, args.topic, args.out, predictor, score_threshold=args.score_threshold,
            max_instances=args.max_instances, min_overlap_pixels=args.min_overlap_pixels,
            min_overlap_ratio=args.min_overlap_ratio,
            min_edge_confidence=args.min_edge_confidence, color_order=args.color_order,
            output_topic=args.output_topic,
            overlay_topic=None if args.no_overlay else args.overlay_topic,
            model_name=model.stem, limit=args.limit)
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"bag_infer: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bag_infer: interrupted; {args.out} holds the frames processed so far",
              file=sys.stderr)
        return 130
    except Exception as exc:  # rosbags' reader/writer errors name the bag
        if type(exc).__module__.startswith("rosbags"):
            print(f"bag_infer: {exc}", file=sys.stderr)
            return 2
        raise
    print(f"bag_infer: {summary['frames']} frames ({summary['malformed']} malformed and "
          f"{summary['failed']} failed skipped), {summary['instances']} instances, mean inference "
          f"{summary['inference_ms']:.0f} ms -> {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
