#!/usr/bin/env python3
"""The paper's Table 6 ablation, reproduced on synthetic bin scenes.

Trains each variant with the same data, schedule and seed (the synth_demo config, shortened
by --iterations), evaluates all of them on the same held-out scenes (another seed), and
writes a markdown report beside the paper's D2S amodal numbers, with a check of each of the
paper's orderings.

    python scripts/ablation.py --iterations 2000 --eval-period 800 \
        --init models/orcnn_demo.safetensors --set solver.lr=0.0003

The learning rate drops tenfold at 60 % and 80 % of the iterations; evaluations at 80 % and
at the end then both come after the first drop, and their difference says whether the
schedule was long enough.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from orcnn_core.fileio import atomic_write_bytes, atomic_write_json
from orcnn_core.train_config import load_train_config
from orcnn_core.training import train

# (name, paper row name, config overrides)
VARIANTS = [
    ("amodal_mrcnn_cls_agn", "AmodalMRCNN-101 (cls-agn)",
     ["model.variant=amodal_mrcnn", "model.class_agnostic_masks=true"]),
    ("amodal_mrcnn", "AmodalMRCNN-101", ["model.variant=amodal_mrcnn"]),
    ("orcnn_no_invisible_loss", "ORCNN (w/o L_IV)", ["model.variant=orcnn_no_invisible_loss"]),
    ("orcnn_no_visible_loss", "ORCNN (w/o L_V)", ["model.variant=orcnn_no_visible_loss"]),
    ("orcnn_independent", "ORCNN (independent)", ["model.variant=orcnn_independent"]),
    ("orcnn_cls_agn", "ORCNN (cls-agn)",
     ["model.variant=orcnn", "model.class_agnostic_masks=true"]),
    ("orcnn", "ORCNN", ["model.variant=orcnn"]),
    ("orcnn_modal_aug", "ORCNN (modal aug)",
     ["model.variant=orcnn", "data.modal_aug.probability=0.5"]),
]

# Follmann et al. 2019, Table 6 (D2S amodal validation, percent): all AP_AV, AP_A, AP_V;
# occluded AP_AV, AP_A, AP_V, AP_IV50.
PAPER = {
    "AmodalMRCNN-101 (cls-agn)": (63.4, 72.2, 64.8, 48.0, 62.2, 50.8, None),
    "AmodalMRCNN-101": (63.8, 72.6, 65.3, 48.7, 63.0, 51.6, None),
    "ORCNN (w/o L_IV)": (34.0, 68.6, 34.7, 26.8, 58.9, 28.0, 0.1),
    "ORCNN (w/o L_V)": (11.0, 66.1, 11.1, 7.5, 56.7, 7.6, 5.8),
    "ORCNN (independent)": (39.5, 72.8, 40.3, 31.9, 62.9, 33.2, 0.1),
    "ORCNN (cls-agn)": (62.3, 65.2, 71.0, 52.5, 55.2, 65.3, 14.7),
    "ORCNN": (58.9, 62.1, 66.2, 48.1, 51.2, 58.9, 8.7),
    "ORCNN (modal aug)": (56.3, 59.9, 62.6, 47.9, 51.0, 57.6, 7.8),
}


def figures(metrics: dict) -> tuple:
    """Our row in the paper's column order, in percent."""
    occ = metrics["occluded"]
    values = (metrics["AP_AV"], metrics["AP_A"], metrics["AP_V"], occ["AP_AV"], occ["AP_A"],
              occ["AP_V"], occ["AP_IV50"])
    return tuple(None if v is None or v < 0 else 100 * v for v in values)


def orderings(rows: dict) -> list:
    """The paper's findings as (claim, holds in the paper, holds here) on AP figures."""
    def col(table, name, i):
        value = table[name][i]
        return float("nan") if value is None else value

    claims = [
        ("w/o L_IV loses AP_AV against ORCNN", lambda r: col(r, "orcnn_no_invisible_loss", 0)
         < col(r, "orcnn", 0)),
        ("w/o L_V collapses AP_V (below half of ORCNN's)",
         lambda r: col(r, "orcnn_no_visible_loss", 2) < 0.5 * col(r, "orcnn", 2)),
        ("AmodalMRCNN has a better AP_A than ORCNN",
         lambda r: col(r, "amodal_mrcnn", 1) > col(r, "orcnn", 1)),
        ("ORCNN has a better AP_V than AmodalMRCNN (amodal used as visible)",
         lambda r: col(r, "orcnn", 2) > col(r, "amodal_mrcnn", 2)),
        ("independent heads lose AP_AV against ORCNN",
         lambda r: col(r, "orcnn_independent", 0) < col(r, "orcnn", 0)),
        ("ORCNN beats w/o L_IV and independent on occluded AP_IV50",
         lambda r: col(r, "orcnn", 6) > max(col(r, "orcnn_no_invisible_loss", 6),
                                            col(r, "orcnn_independent", 6))),
        ("class-agnostic ORCNN beats class-specific ORCNN on AP_AV",
         lambda r: col(r, "orcnn_cls_agn", 0) > col(r, "orcnn", 0)),
        ("modal augmentation stays within 3 points of ORCNN's AP_AV",
         lambda r: abs(col(r, "orcnn_modal_aug", 0) - col(r, "orcnn", 0)) <= 3),
    ]
    paper_rows = {name: PAPER[paper] for name, paper, _ in VARIANTS}

    def here(test):
        try:
            return test(rows)
        except KeyError:  # a variant it needs is still training (--partial)
            return None
    return [(claim, test(paper_rows), here(test)) for claim, test in claims]


def fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def verdict(holds) -> str:
    return "pending" if holds is None else "yes" if holds else "no"


def history(out: Path) -> list:
    """(iteration, AP_AV in percent) of every evaluation in a run's log.jsonl."""
    rows = []
    for line in (out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "metrics" in record:
            rows.append((record["iteration"], 100 * record["metrics"]["AP_AV"]))
    return rows


def start_text(args) -> str:
    if not args.init:
        return "is trained from scratch with"
    return (f"starts from the same trained detector (backbone, RPN and box head of "
            f"`{args.init}`; mask heads from random initialisation, `init_mask_heads=false`), "
            f"as the paper's variants start from COCO-trained weights, and trains on with")


def convergence(histories: dict) -> str:
    steps = sorted({it for rows in histories.values() for it, _ in rows})
    head = ("| model | " + " | ".join(str(s) for s in steps) + " |\n|---|"
            + "---|" * len(steps) + "\n")
    body = "".join(
        f"| {paper} | " + " | ".join(fmt(dict(histories.get(name, [])).get(s))
                                     for s in steps) + " |\n"
        for name, paper, _ in VARIANTS)
    last = [ap for _, ap in histories.get("orcnn", [])[-2:]]
    if len(last) < 2:
        return (f"AP_AV (percent) at the one evaluation of each run (--eval-period gives "
                f"more).\n\n{head}{body}")
    return (f"AP_AV (percent) at each evaluation; the ORCNN row moves by "
            f"{abs(last[1] - last[0]):.1f} points between its last two evaluations."
            f"\n\n{head}{body}")


def command(args) -> str:
    """The arguments that decide the runs (not which process trained which variant)."""
    words = [f"--iterations {args.iterations}", f"--eval-period {args.eval_period}",
             f"--val-images {args.val_images}", f"--val-seed {args.val_seed}"]
    words += [f"--init {args.init}"] if args.init else []
    words += [f"--set {item}" for item in args.set]
    return " ".join(words)


def report(rows: dict, args, seconds: dict, histories: dict) -> str:
    header = ("| model | AP_AV | AP_A | AP_V | occl. AP_AV | occl. AP_A | occl. AP_V | "
              "occl. AP_IV50 |\n|---|---|---|---|---|---|---|---|\n")
    ours = "".join(f"| {paper}{'' if name in rows else ' *(training)*'} | "
                   + " | ".join(fmt(v) for v in rows.get(name, (None,) * 7)) + " |\n"
                   for name, paper, _ in VARIANTS)
    theirs = "".join(f"| {paper} | " + " | ".join(fmt(v) for v in PAPER[paper]) + " |\n"
                     for _, paper, _ in VARIANTS)
    checks = "".join(f"| {claim} | {verdict(p)} | {verdict(h)} |\n"
                     for claim, p, h in orderings(rows))
    total_min = sum(seconds.values()) / 60
    return f"""# Ablation: the paper's Table 6 on synthetic scenes

Produced by `python scripts/ablation.py {command(args)}` ({total_min:.0f} min of
training in all, one CPU thread per variant). Every variant {start_text(args)} the
`synth_demo` configuration shortened to {args.iterations} iterations (same data order,
schedule shape and seed), then is evaluated on the same {args.val_images} held-out synthetic
scenes (seed {args.val_seed}) with `orcnn_core.evaluation` (docs/evaluation.md). Figures in
percent. The names keep the paper's rows; our backbone is the small ResNet-18-FPN, not
ResNet-101. Our "ORCNN (modal aug)" adds modal augmentation (`data.modal_aug.probability=0.5`,
objects cut from other training scenes) to the amodal training data; the paper's row of
that name is trained on modally augmented data alone.

## Ours (synthetic scenes, ResNet-18-FPN, {args.iterations} iterations)

{header}{ours}
## The paper (D2S amodal validation, ResNet-101-FPN from COCO, Table 6)

{header}{theirs}
## Do the paper's orderings hold here?

| finding | in the paper | here |
|---|---|---|
{checks}
AmodalMRCNN predicts no visible masks (visible := amodal inside the image), so its AP_IV50
comes only from amodal parts outside the image, which count as hidden for every model.
Per-variant metrics: `{args.output_dir}/*/metrics.json`.

## Is the schedule long enough?

{convergence(histories)}"""


def variant_overrides(name: str, overrides: list, args) -> list:
    """The synth_demo overrides of one variant in this run."""
    init = [f"init_weights={args.init}", "init_mask_heads=false"] if args.init else []
    return [
        f"output_dir={Path(args.output_dir) / name}", f"solver.iterations={args.iterations}",
        f"solver.steps=[{int(args.iterations * 0.6)},{int(args.iterations * 0.8)}]",
        f"solver.warmup_iters={min(200, args.iterations // 5)}",
        f"data.synth_val.num_images={args.val_images}",
        f"data.synth_val.seed={args.val_seed}", f"eval_period={args.eval_period}",
        f"checkpoint_period={min(250, args.iterations)}", *init, *overrides, *args.set]


def reuse(out: Path, settings: list):
    """(row, seconds) of a variant finished before with the same settings; exits naming
    the difference when it was trained with others (its folder mixes runs)."""
    result = json.loads((out / "done").read_text())
    if result.get("settings", settings) != settings:
        sys.exit(f"{out}: trained with other settings ({result['settings']}, now "
                 f"{settings}); use another --output-dir")
    return tuple(result["row"]), result["seconds"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--eval-period", type=int, default=0,
                        help="evaluate every N iterations too (0: at the end only)")
    parser.add_argument("--init", default="", metavar="WEIGHTS",
                        help="start every variant from this model's backbone, RPN and box "
                             "head, with new mask heads (default: from scratch)")
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--val-seed", type=int, default=1000)
    parser.add_argument("--output-dir", default="outputs/ablation")
    parser.add_argument("--out", default="", help="the markdown report (default: "
                        "report.md in the output folder; docs/ablation.md quotes it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every variant")
    parser.add_argument("--partial", action="store_true",
                        help="train nothing; write the report with the variants finished "
                             "so far (the others marked as training)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="train just these variants (several processes can share the "
                             "work); the report is written once every variant is done")
    args = parser.parse_args(argv)
    rows, seconds, histories = {}, {}, {}
    names = [name for name, _, _ in VARIANTS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(names)}")
    for name, _, overrides in VARIANTS:
        out = Path(args.output_dir) / name
        settings = variant_overrides(name, overrides, args)
        if (out / "done").is_file():
            print(f"{name}: trained before, reusing {out / 'done'}")
            rows[name], seconds[name] = reuse(out, settings)
            histories[name] = history(out)
            continue
        if args.partial or (args.only and name not in args.only):
            continue
        start = time.perf_counter()
        # An interrupted variant continues from its last checkpoint.
        result = train(load_train_config("synth_demo", settings),
                       resume=(out / "checkpoint_last.pt").is_file(), progress=True)
        seconds[name] = time.perf_counter() - start
        rows[name] = figures(result["metrics"])
        histories[name] = history(out)
        atomic_write_json(out / "done", {"row": rows[name], "seconds": seconds[name],
                                         "settings": settings})
        print(f"{name}: {' '.join(fmt(v) for v in rows[name])} ({seconds[name] / 60:.1f} min)")
    if len(rows) < len(VARIANTS) and not args.partial:
        print(f"{len(rows)} of {len(VARIANTS)} variants done; the report waits for the rest "
              f"(--partial writes it now)")
        return 0
    text = report(rows, args, seconds, histories)
    atomic_write_bytes(args.out or Path(args.output_dir) / "report.md", text.encode("utf-8"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
