"""The ``orcnn-core`` command line.

Each subcommand's work lives in the module that owns it; this file only parses arguments.
Bad input raises :class:`orcnn_core.errors.InputError`, printed as one line, exit code 2.
"""

import argparse
import sys

from orcnn_core import __version__
from orcnn_core.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orcnn-core",
        description="ORCNN amodal instance segmentation: data, training, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_evaluate_parser(subparsers)
    _add_synth_parser(subparsers)
    return parser


def _add_evaluate_parser(subparsers) -> None:
    sub = subparsers.add_parser(
        "evaluate", help="amodal metrics (AP_AV, AP_A, AP_V, occluded AP_IV50, order)",
        description="Evaluate amodal predictions against D2S-amodal-style ground truth "
                    "(docs/evaluation.md): prints a table, optionally writes the metrics.")
    sub.add_argument("--gt", required=True, metavar="GT.json",
                     help="ground truth: COCO JSON with amodal and visible masks")
    sub.add_argument("--predictions", required=True, metavar="PRED.json",
                     help="COCO results list with amodal 'segmentation' and 'visible_mask'")
    sub.add_argument("--out", metavar="METRICS.json",
                     help="write the metrics here as JSON (atomically)")
    sub.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from orcnn_core.evaluation import run_evaluate
    return run_evaluate(args.gt, args.predictions, args.out)


def _add_synth_parser(subparsers) -> None:
    sub = subparsers.add_parser(
        "synth", help="render the synthetic amodal data set (groceries in a bin)",
        description="Render top-down scenes of household objects piled on a table or in a "
                    "bin, with exact amodal, visible and invisible masks and 'lies on' "
                    "relations: OUT/images/*.png, then OUT/annotations.json "
                    "(docs/data_format.md). The same seed gives the same files.")
    sub.add_argument("--out", required=True, metavar="DIR", help="output folder")
    sub.add_argument("--num-images", type=int, default=100, metavar="N")
    sub.add_argument("--seed", type=int, default=0, metavar="S")
    sub.add_argument("--size", default="320x240", metavar="WxH", help="image size")
    sub.add_argument("--classes", type=int, default=8, metavar="K",
                     help="number of object classes (1..10)")
    sub.add_argument("--min-objects", type=int, metavar="N", help="objects per scene, "
                     "before hidden ones are dropped (default 4)")
    sub.add_argument("--max-objects", type=int, metavar="N", help="(default 10)")
    sub.set_defaults(run=_run_synth)


def _run_synth(args) -> int:
    from orcnn_core.synth import run_cli
    return run_cli(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except InputError as exc:
        print(f"orcnn-core {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
