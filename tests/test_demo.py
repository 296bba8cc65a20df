"""`zigspark demo`: the main job's fast path end to end, with the test-suite settings (seconds)."""

import json

import pytest

from zigspark.cli import main

pytestmark = pytest.mark.cpu


def test_demo_writes_summary_and_pngs(tmp_path):
    pytest.importorskip("sklearn", reason="the demo's digits ship with scikit-learn")
    out = tmp_path / "demo"
    assert main(["demo", "--size", "test", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {r["strategy"] for r in summary["recognizer"]["pruning"]} == {"hiprune", "attention", "random"}
    assert sorted({r["tokens"] for r in summary["recognizer"]["pruning"]}) == [7, 21, 64]
    assert 0.0 <= summary["samples"]["class_accuracy"] <= 1.0
    assert summary["samples"]["frechet_to_test"] >= 0.0
    assert 0.0 <= summary["probe"]["test_accuracy"] <= 1.0
    assert {"selective_scan", "causal_conv1d", "flash_attention"} <= set(summary["backends"])
    for name in ["summary.md", "samples.png", *summary["samples"]["grids"]]:
        assert (out / name).stat().st_size > 0, name
    assert "Backends that ran" in (out / "summary.md").read_text()


def test_demo_rejects_unknown_size(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--size", "huge"])
    assert "invalid choice" in capsys.readouterr().err
