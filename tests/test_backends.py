"""Backend selection, the environment report and the command line."""

import json
import logging
import subprocess
import sys

import pytest
import torch

import zigspark
from zigspark import backends
from zigspark.validation import check_same_device

pytestmark = pytest.mark.cpu


def test_available_backends_reports_every_op_and_backend():
    table = zigspark.available_backends("cpu")
    assert set(table) == set(backends.ops()) and "stat_topk" in table
    for op, entry in table.items():
        assert set(entry) == {"cuda", "triton", "reference"}
        assert entry["reference"] is None
        assert isinstance(entry["cuda"], str)  # no CUDA tensors on "cpu": always a reason


def test_auto_table_covers_every_op_and_is_followed(caplog):
    table = backends.auto_table()["ops"]
    for op in backends.ops():
        assert {"cpu", "cuda", "evidence"} <= set(table[op]), f"auto_backends.json lacks cpu/cuda/evidence for {op}"
        assert set(table[op]["cpu"]) | set(table[op]["cuda"]) <= set(backends.BACKENDS)
    # auto on CPU follows the table: its first entry that can run
    expected = next(b for b in table["stat_topk"]["cpu"]
                    if backends.unavailable_reason("stat_topk", b, torch.device("cpu")) is None)
    backends._logged.clear()
    with caplog.at_level(logging.INFO, logger="zigspark"):
        zigspark.stat_topk(torch.randn(2, 32), 4)
        zigspark.stat_topk(torch.randn(2, 32), 4)
    assert zigspark.last_backends()["stat_topk"] == expected
    messages = [r.getMessage() for r in caplog.records if "stat_topk" in r.getMessage()]
    assert len(messages) == 1, messages  # logged once, not per call
    assert f"runs {expected}" in messages[0]


def test_unknown_backend_and_unavailable_backend_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("stat_topk", "tpu", torch.device("cpu"))
    with pytest.raises(zigspark.BackendUnavailableError, match="cuda"):
        backends.resolve("stat_topk", "cuda", torch.device("cpu"))


def test_dtype_support_is_part_of_the_reason(monkeypatch):
    monkeypatch.setitem(backends._OP_DTYPES, "toy", {"reference": (torch.float32,)})
    reason = backends.unavailable_reason("toy", "reference", torch.device("cpu"), torch.float16)
    assert "supports float32, not float16" in reason


def test_same_device_check_names_the_tensors():
    a = torch.randn(2)
    b = torch.randn(2, device="meta")
    with pytest.raises(ValueError, match="x on cpu, scores on meta"):
        check_same_device(x=a, scores=b)
    assert check_same_device(x=a, y=None) == a.device


def test_env_command_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "zigspark", "env"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out and "zigspark._C:" in out and "stat_topk:" in out
    info = json.loads(subprocess.run([sys.executable, "-m", "zigspark", "env", "--json"], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["torch"] == torch.__version__ and "stat_topk" in info["backends"]


def test_check_command_passes_on_this_machine(tmp_path):
    result = subprocess.run([sys.executable, "-m", "zigspark", "check", "--device", "cpu", "--json",
                             str(tmp_path / "c.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "c.json").read_text())
    assert any(r["backend"] == "reference" and r["status"] == "pass" for r in rows)
    assert all(r["status"] in ("pass", "unavailable") for r in rows)
