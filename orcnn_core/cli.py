"""The ``orcnn-core`` command line.

Each subcommand's work lives in the module that owns it; this file only parses arguments.
Bad input raises :class:`orcnn_core.errors.InputError`, printed as one line, exit code 2.
"""

import argparse
import sys

from orcnn_core import __version__
from orcnn_core.errors import InputError

BACKEND_HELP = ("inference back-end: eager (default), torchscript, onnxruntime, tensorrt "
                "(CUDA); the last three build a graph per image size (seconds each)")
# Kept in step with orcnn_core.data.FORMAT_NAMES (which checks the value), so that --help
# needs no import of the data module.
FORMAT_HELP = ("ground-truth layout: auto (default: detected from the keys), amodal_coco "
               "(also d2s_amodal, d2sa, cocoa_cls), coco, cocoa, kins (kins2019, kins2020); a "
               "named layout must fit the file (docs/data_format.md)")
ANNOTATORS_HELP = ("COCOA images annotated by several people: first (default, as the COCOA "
                   "amodal API scores) or all (their regions merged)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orcnn-core",
        description="ORCNN amodal instance segmentation: data, training, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_predict_parser(subparsers)
    _add_export_parser(subparsers)
    _add_synth_parser(subparsers)
    _add_convert_parser(subparsers)
    return parser


def _add_train_parser(subparsers) -> None:
    sub = subparsers.add_parser(
        "train", help="train a model from a YAML config",
        description="Train ORCNN as a YAML config says (orcnn_core/train_config.py; shipped "
                    "configs: synth_demo, d2s_amodal, cocoa_cls, kins). Writes checkpoints, "
                    "TensorBoard logs, metrics and model_final.safetensors to the output "
                    "folder. SIGINT/SIGTERM save a checkpoint and stop; --resume continues. "
                    "Several processes or machines: torchrun ... -m orcnn_core.cli train ...")
    sub.add_argument("--config", required=True, metavar="FILE.yaml",
                     help="config file, or the name of a shipped config")
    sub.add_argument("--output-dir", metavar="DIR", help="overrides output_dir")
    sub.add_argument("--resume", action="store_true",
                     help="continue from OUTPUT_DIR/checkpoint_last.pt")
    sub.add_argument("--force", action="store_true",
                     help="start over in an output folder that holds an earlier run (a "
                          "checkpoint_last.pt or log.jsonl): deletes its checkpoint, log, "
                          "metrics.json and model_final.safetensors first; without --force "
                          "or --resume such a folder is refused")
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set solver.lr=0.01 (repeatable)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.set_defaults(run=_run_train)


def _run_train(args) -> int:
    import signal

    from orcnn_core.train_config import load_train_config
    from orcnn_core.training import TrainingStopped, train

    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_train_config(args.config, overrides)
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress,
                       force=args.force)
    except TrainingStopped as exc:
        print(f"orcnn-core train: stopped: {exc}", file=sys.stderr)
        return 1
    if result["stopped"]:
        return 128 + int(getattr(signal, result["stopped"]))
    if result["weights"]:
        print(f"weights: {result['weights']}")
    return 0


def _add_evaluate_parser(subparsers) -> None:
    sub = subparsers.add_parser(
        "evaluate", help="amodal metrics (AP_AV, AP_A, AP_V, occluded AP_IV50, order)",
        description="Evaluate amodal predictions against D2S-amodal-style ground truth "
                    "(docs/evaluation.md): prints a table, optionally writes the metrics. "
                    "Two forms: --gt GT.json --predictions PRED.json scores a predictions "
                    "file; --weights W --data GT.json [--images DIR] first runs the model on "
                    "the ground truth's images (same results as predict --gt, then the first "
                    "form).")
    files = sub.add_argument_group("scoring a predictions file")
    files.add_argument("--gt", metavar="GT.json",
                       help="ground truth: COCO JSON with amodal and visible masks")
    files.add_argument("--predictions", metavar="PRED.json",
                       help="COCO results list with amodal 'segmentation' and 'visible_mask'")
    model = sub.add_argument_group("running a model")
    model.add_argument("--weights", metavar="W.safetensors", help="model weights file")
    model.add_argument("--data", metavar="GT.json", help="ground truth whose images to run on")
    model.add_argument("--images", metavar="DIR", help="folder the ground truth's file_names "
                       "are relative to (default: GT.json's folder; a file_name's base name "
                       "directly in DIR is found too)")
    model.add_argument("--score-thresh", type=float, metavar="S",
                       help="score threshold (default: the model's)")
    model.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    model.add_argument("--backend", metavar="NAME", help=BACKEND_HELP)
    sub.add_argument("--format", default="auto", metavar="F", help=FORMAT_HELP)
    sub.add_argument("--annotators", default="first", choices=["first", "all"],
                     help=ANNOTATORS_HELP)
    sub.add_argument("--occluded-rule", default="reference", choices=["reference", "paper"],
                     help="detections of ignored ground truths in the occluded and breakdown "
                          "evaluations: reference (default: COCO's rule, as the COCOA amodal "
                          "API) or paper (also ignore every detection with amodal IoU >= 0.5 "
                          "with one; docs/evaluation.md)")
    sub.add_argument("--out", metavar="METRICS.json",
                     help="write the metrics here as JSON (atomically)")
    sub.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    file_form = {"--gt": args.gt, "--predictions": args.predictions}
    model_form = {"--weights": args.weights, "--data": args.data, "--images": args.images,
                  "--score-thresh": args.score_thresh, "--device": args.device,
                  "--backend": args.backend}
    given_file = [k for k, v in file_form.items() if v is not None]
    given_model = [k for k, v in model_form.items() if v is not None]
    if given_file and given_model:
        raise InputError(f"{', '.join(given_file)} (scoring a predictions file) cannot be "
                         f"mixed with {', '.join(given_model)} (running a model): give either "
                         f"--gt and --predictions, or --weights and --data")
    if given_model:
        missing = [k for k in ("--weights", "--data") if model_form[k] is None]
        if missing:
            raise InputError(f"running a model needs --weights and --data; missing "
                             f"{' and '.join(missing)}")
        from orcnn_core.commands import run_evaluate_weights
        return run_evaluate_weights(args)
    missing = [k for k, v in file_form.items() if v is None]
    if missing:
        raise InputError(f"give --gt GT.json and --predictions PRED.json (or --weights and "
                         f"--data); missing {' and '.join(missing)}")
    from orcnn_core.evaluation import run_evaluate
    return run_evaluate(args.gt, args.predictions, args.out, args.occluded_rule, args.format,
                        args.annotators)


def _add_predict_parser(subparsers) -> None:
    sub = subparsers.add_parser(
        "predict", help="run a model on images: overlays and a COCO predictions file",
        description="Run a weights file on image files. Writes OUT/overlays/*.png (per "
                    "instance in its class colour: visible pixels tinted, occluded pixels in a "
                    "lighter tone, the amodal outline, the pick order number) and "
                    "OUT/predictions.json (COCO results, docs/data_format.md). Image ids: "
                    "those of --gt, so that evaluate --gt GT --predictions "
                    "OUT/predictions.json scores them; else 1..N in sorted file order, "
                    "listed in OUT/images.json.")
    sub.add_argument("--weights", required=True, metavar="W.safetensors",
                     help="model weights file")
    sub.add_argument("--images", required=True, metavar="DIR|GLOB",
                     help="a folder (its image files), a glob pattern (quote it; ** recurses) "
                          "or one image file")
    sub.add_argument("--out", required=True, metavar="DIR", help="output folder")
    sub.add_argument("--gt", metavar="GT.json", help="ground truth the images belong to: "
                     "image ids, category ids and mask padding come from it")
    sub.add_argument("--format", default="auto", metavar="F", help=FORMAT_HELP)
    sub.add_argument("--score-thresh", type=float, metavar="S",
                     help="score threshold (default: the model's)")
    sub.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sub.add_argument("--backend", default="eager", metavar="NAME", help=BACKEND_HELP)
    sub.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from orcnn_core.commands import run_predict
    return run_predict(args)


def _add_export_parser(subparsers) -> None:
    sub = subparsers.add_parser(
        "export", help="export a model to ONNX, checked against torch with onnxruntime",
        description="Export the whole detector for one fixed image size to ONNX (TorchScript "
                    "exporter). Input 'image': float32 [3, H, W], RGB in [0, 1]. Outputs, D "
                    "detections (data dependent): 'boxes' float32 [D, 4] amodal xyxy in image "
                    "pixels, 'labels' int64 [D] (1..K), 'scores' float32 [D] (descending, "
                    "score threshold baked in), 'amodal_mask_logits' and "
                    "'visible_mask_logits' float32 [D, M, M] over each box (sigmoid >= 0.5: "
                    "in the mask; occluded = amodal AND NOT visible). onnxruntime's outputs "
                    "are compared with torch's on a test image; the max abs differences are "
                    "printed. Tolerances: boxes 0.05 px, scores 1e-3, mask logits 1e-2, equal "
                    "labels and detection count. The file is written (atomically) only when "
                    "the check passes; otherwise exit code 1 and nothing written.")
    sub.add_argument("--weights", required=True, metavar="W.safetensors",
                     help="model weights file")
    sub.add_argument("--format", default="onnx", choices=["onnx"], help="(only onnx)")
    sub.add_argument("--out", required=True, metavar="FILE.onnx", help="output file")
    sub.add_argument("--height", type=int, default=480, metavar="H",
                     help="input image height (default 480)")
    sub.add_argument("--width", type=int, default=640, metavar="W",
                     help="input image width (default 640)")
    sub.add_argument("--opset", type=int, default=17, metavar="N",
                     help="ONNX opset, 11..20 (default 17)")
    sub.add_argument("--score-thresh", type=float, metavar="S",
                     help="score threshold baked into the graph (default: the model's)")
    sub.add_argument("--check-image", metavar="IMAGE",
                     help="image for the check, resized to H x W (default: a synthetic "
                          "scene)")
    sub.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from orcnn_core.commands import run_export
    return run_export(args)


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


def _add_convert_parser(subparsers) -> None:
    sub = subparsers.add_parser(
        "convert", help="convert an annotation file (COCOA, KINS, D2SA, COCO) to ours",
        description="Read an annotation file in any supported layout and write it as our "
                    "amodal COCO (docs/data_format.md): masks as RLE on the padded canvas, "
                    "ids, crowd and ignore flags and occlusion rates as read, and the "
                    "occlusion relations the source states (COCOA depth_constraint, KINS "
                    "oco_id/ico_id) or, where it states none, those its masks show; "
                    "'relations_source' says which. Evaluating the output gives the same "
                    "metrics as the input. OUT is written atomically and never over IN.")
    sub.add_argument("input", metavar="IN", help="annotation file to read")
    sub.add_argument("output", metavar="OUT", help="file to write (our amodal COCO JSON)")
    sub.add_argument("--format", default="auto", metavar="F", help=FORMAT_HELP)
    sub.add_argument("--annotators", default="first", choices=["first", "all"],
                     help=ANNOTATORS_HELP)
    sub.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from orcnn_core.commands import run_convert
    return run_convert(args)


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
    except (MemoryError, RuntimeError) as exc:
        # torch's allocators raise RuntimeError ("can't allocate memory", CUDA "out of
        # memory"); other RuntimeErrors are bugs and keep their traceback.
        if not isinstance(exc, MemoryError) and "allocate memory" not in str(exc) \
                and "out of memory" not in str(exc):
            raise
        print(f"orcnn-core {args.command}: error: out of memory ({str(exc).splitlines()[0]}"
              f"); the image or the model's min_size / max_size is too large for this "
              f"machine", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
