"""Soak: the perception node programs (raw and compressed input) under a 30 Hz camera for
300 frames, 10 % of them malformed in every way the node must survive.

scripts/soak.py runs the same code for 10,000 frames with a report; here its records are
checked directly: what the camera sent, every answer, the nodes' /diagnostics counters
sampled four times a second, and the nodes' RSS.
"""

import importlib

import pytest

pytest.importorskip("rclpy", reason="rclpy not importable: run make setup")

FRAMES = 300


@pytest.fixture(scope="module")
def soak():
    return importlib.import_module("orcnn_ros.soak")


def test_node_survives_a_glitchy_camera(soak, tmp_path, tiny_model_path):
    report, streams = soak.run_node_soak(
        tiny_model_path, frames=FRAMES, rate=30.0, malformed=0.1,
        inputs=("raw", "compressed"), width=160, height=120, max_rss_growth_mb=100.0,
        out_dir=tmp_path, log=lambda line: None)
    assert [s.name for s in streams] == ["raw", "compressed"]
    for stream in streams:
        where = f"{stream.name} (log {stream.log_path})"
        assert stream.alive_at_end and stream.exit_status == 0, where
        assert "Traceback" not in stream.log_path.read_text(), where
        # The camera: 300 frames, 30 malformed, every kind several times.
        kinds = [kind for _, kind in stream.sent if kind]
        assert len(stream.sent) == FRAMES and len(kinds) == FRAMES // 10, where
        assert set(kinds) == {kind for kind, _, _ in stream.malformed}, where
        assert min(kinds.count(k) for k in set(kinds)) >= 5, where
        # Counters: every frame reached the node and is accounted for exactly once.
        counts = stream.diagnostics[-1][1]
        assert counts["received"] == FRAMES, (where, counts)
        assert counts["received"] == (counts["processed"] + counts["dropped"]
                                      + counts["malformed"] + counts["failed"]), counts
        assert counts["failed"] == 0, where
        # Header-detectable malformed frames are all counted as malformed; the truncated
        # PNG (only its decoder can tell) may be replaced in the slot first.
        header_kinds = {kind for kind, found_by, _ in stream.malformed if found_by == "header"}
        assert sum(k in header_kinds for k in kinds) <= counts["malformed"] <= len(kinds)
        # Answers: one per processed frame, in stamp order, never to a malformed frame.
        stamps = [a[0] for a in stream.answers]
        good = {s for s, kind in stream.sent if not kind}
        assert len(stamps) == counts["processed"] >= 5, (where, counts)
        assert all(b > a for a, b in zip(stamps, stamps[1:])), where
        assert set(stamps) <= good, where
        # No queue builds up inside the node, and none is left at the end.
        in_flight = [stream.in_flight(values) for _, values in stream.diagnostics]
        assert len(in_flight) >= 10 and max(in_flight) <= 3 and in_flight[-1] == 0, in_flight
        # Memory: warm RSS to the end, sampled twice a second (generous bound).
        warm = [rss for _, sent, rss in stream.rss if sent >= FRAMES // 10 and rss > 0]
        assert len(warm) >= 10, where
        assert warm[-1] - warm[0] < 100 * 2**20, (where, warm[0], warm[-1])
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    summary = soak.node_summary_markdown(report)
    assert "all checks pass" in summary and "| RSS start / end / growth / max (MB) |" in summary


def test_soak_command_line_errors(soak, tmp_path, capsys):
    for args in (["node", "--frames", "0"], ["node", "--malformed", "1.5"],
                 ["node", "--inputs", "video"], ["training-typo"]):
        with pytest.raises(SystemExit) as exit_info:
            soak.main(args)
        assert exit_info.value.code == 2, args
    assert soak.main(["node", "--model", str(tmp_path / "none.safetensors"),
                      "--out", str(tmp_path)]) == 2
    assert "none.safetensors does not exist" in capsys.readouterr().err
