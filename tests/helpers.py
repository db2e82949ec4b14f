"""Small helpers shared by several test modules."""

import json

import numpy as np


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
