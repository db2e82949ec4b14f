"""Small helpers shared by several test modules."""

import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def logged_losses(out_dir, once=False) -> dict:
    """iteration -> total loss, from a training run's log.jsonl (a partial line fails);
    ``once``: fail on an iteration logged twice too."""
    losses = {}
    for line in (out_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "losses" in record:
            if once:
                assert record["iteration"] not in losses, \
                    f"iteration {record['iteration']} twice"
            losses[record["iteration"]] = record["losses"]["total"]
    return losses


class CreatesFile:
    """Unpickling this would create ``path``: the marker of code run by a loader."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_same_arrays(a, b, names):
    """The attributes ``names`` of ``a`` and ``b`` are equal arrays."""
    for name in names:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def assert_one_line_error(code, err, *fragments):
    """A command-line refusal: exit code 2 and one line on stderr, no traceback, holding
    each of ``fragments``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert str(fragment) in lines[0], err


class IgnoringEval(COCOeval):
    """COCOeval honouring ground-truth ``ignore`` flags given as ``flag`` (pycocotools
    resets ``ignore`` to ``iscrowd``): what the COCOA amodal API does with ground truths
    outside its occlusion range."""

    def _prepare(self):
        super()._prepare()
        for gts in self._gts.values():
            for g in gts:
                g["ignore"] = int(g["ignore"] or g.get("flag", 0))


def coco_segm_stats(dataset: dict, results: list, evaluator=COCOeval):
    """pycocotools' segm ``stats`` (AP, AP50, AP75, ...) of ``results`` on the COCO
    ``dataset`` (a dict), its printout suppressed: the independent reference."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        run = evaluator(coco_gt, coco_gt.loadRes(results), "segm")
        run.evaluate()
        run.accumulate()
        run.summarize()
    return run.stats
