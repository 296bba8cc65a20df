"""Tile tuning for the Triton kernels (triton_kernels/_tune.py): what is timed, kept and run, with a fake timer."""

import math

import pytest
import torch

import zigspark
from zigspark.triton_kernels import _tune
from zigspark.triton_kernels._tune import Blocks

pytestmark = pytest.mark.cpu

CANDIDATES = [Blocks(64, 64, 4), Blocks(128, 64, 8), Blocks(32, 32, 4)]
DEVICE = torch.device("cpu")


@pytest.fixture
def tuning(monkeypatch):
    """Tuning switched on, a fresh memory of choices, and a timer that reads the cost from a table."""
    monkeypatch.setenv(_tune.ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_tune, "_best", {})
    monkeypatch.setattr(_tune, "_loaded", {})
    monkeypatch.setattr(_tune, "_env_loaded", False)
    monkeypatch.delenv(_tune.TILES_ENV, raising=False)
    cost = {Blocks(64, 64, 4): 2.0, Blocks(128, 64, 8): 1.0, Blocks(32, 32, 4): 3.0}
    timed = []

    def fake_time(run, blocks):
        timed.append(blocks)
        return cost[blocks]

    monkeypatch.setattr(_tune, "_time", fake_time)
    return cost, timed


def test_fastest_candidate_is_kept_per_key(tuning):
    cost, timed = tuning
    ran = []
    assert _tune.launch("k", ("a",), CANDIDATES, ran.append, DEVICE) == Blocks(128, 64, 8)
    assert timed == CANDIDATES and ran == [Blocks(128, 64, 8)]
    # the same key again: nothing timed, the kept choice runs
    cost[Blocks(32, 32, 4)] = 0.1
    assert _tune.launch("k", ("a",), CANDIDATES, ran.append, DEVICE) == Blocks(128, 64, 8)
    assert len(timed) == 3
    # a new key (or kernel) tunes again and sees the new costs
    assert _tune.launch("k", ("b",), CANDIDATES, ran.append, DEVICE) == Blocks(32, 32, 4)
    assert _tune.launch("other", ("a",), CANDIDATES, ran.append, DEVICE) == Blocks(32, 32, 4)
    assert len(_tune.chosen()) == 3 and "128x64 w8 s3" in _tune.chosen().values()


def test_candidates_that_fail_are_passed_over_and_none_working_runs_the_first_untimed(tuning):
    cost, timed = tuning
    cost[Blocks(128, 64, 8)] = math.inf
    assert _tune.launch("k", (), CANDIDATES, lambda b: None, DEVICE) == Blocks(64, 64, 4)
    for blocks in CANDIDATES:
        cost[blocks] = math.inf
    ran = []
    assert _tune.launch("k2", (), CANDIDATES, ran.append, DEVICE) == CANDIDATES[0]
    assert ran == [CANDIDATES[0]] and not any(key.startswith("k2") for key in _tune.chosen())
    _tune.launch("k2", (), CANDIDATES, ran.append, DEVICE)      # not remembered: timed again
    assert len(timed) == 9


def test_any_failure_while_timing_counts_as_infinitely_slow():
    pytest.importorskip("triton")

    def fails(blocks):
        raise torch.OutOfMemoryError("no room for do_bench's buffer")

    assert _tune._time(fails, CANDIDATES[0]) == math.inf


def test_capture_keeps_a_tuned_tile_and_times_nothing(tuning, monkeypatch):
    _, timed = tuning
    _tune.launch("k", ("a",), CANDIDATES, lambda b: None, DEVICE)
    monkeypatch.setattr(_tune, "_capturing", lambda device: True)
    assert _tune.launch("k", ("a",), CANDIDATES, lambda b: None, DEVICE) == Blocks(128, 64, 8)
    assert _tune.launch("k", ("new",), CANDIDATES, lambda b: None, DEVICE) == CANDIDATES[0]
    assert len(timed) == 3


@pytest.mark.parametrize("switch_off", ["env", "interpreter"])
def test_first_candidate_runs_untimed_when_tuning_is_off(tuning, monkeypatch, switch_off):
    _, timed = tuning
    if switch_off == "env":
        monkeypatch.setenv(_tune.ENV, "0")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    ran = []
    assert _tune.launch("k", (), CANDIDATES, ran.append, DEVICE) == CANDIDATES[0]
    assert ran == [CANDIDATES[0]] and timed == [] and _tune.chosen() == {}


def test_pinned_overrides_and_restores(tuning):
    _, timed = tuning
    ran = []
    with _tune.pinned("k", Blocks(16, 16, 2)):
        with _tune.pinned("k", Blocks(32, 32, 4)):
            _tune.launch("k", (), CANDIDATES, ran.append, DEVICE)
        _tune.launch("k", (), CANDIDATES, ran.append, DEVICE)
    assert ran == [Blocks(32, 32, 4), Blocks(16, 16, 2)] and timed == []
    _tune.launch("k", (), CANDIDATES, ran.append, DEVICE)
    assert ran[-1] == Blocks(128, 64, 8)


def test_fit_caps_tiles_to_the_sequences_and_drops_repeats():
    assert _tune.fit(CANDIDATES, 20, 1000) == [Blocks(32, 64, 4), Blocks(32, 64, 8), Blocks(32, 32, 4)]
    assert _tune.fit(CANDIDATES, 1, 1) == [Blocks(16, 16, 4), Blocks(16, 16, 8)]
    assert _tune.fit(CANDIDATES, 5000, 5000) == CANDIDATES
    assert [_tune.bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


def test_attention_candidates_start_with_the_hand_picked_tile_and_fit():
    pytest.importorskip("triton")
    from zigspark.triton_kernels import attention

    for kernel in ("fwd", "dq", "dkdv", "received"):
        for head_dim in (16, 40, 64, 96, 128, 200, 256):
            half = attention.candidates(kernel, head_dim, 8192, 8192, torch.bfloat16)
            assert half[0] == (Blocks(64, 64, 4) if head_dim <= 64 else Blocks(32, 32, 8))
            assert len(half) >= 2 and len(set(half)) == len(half)
            assert all(b.block_m >= 16 and b.block_n >= 16 for b in half)
            assert len(attention.candidates(kernel, head_dim, 8192, 8192, torch.float32)) == 1
        short = attention.candidates(kernel, 64, 10, 30, torch.float16)
        assert all(b.block_m == 16 and b.block_n <= 32 for b in short)


def test_tiles_carried_to_another_process_run_untimed_even_with_tuning_off(tuning, monkeypatch):
    cost, timed = tuning
    _tune.launch("k", ("a", 64), CANDIDATES, lambda b: None, DEVICE)
    table = zigspark.tuning.tiles()
    assert table == {"k a 64": "128x64 w8 s3"}       # no device index: one table serves every rank
    monkeypatch.setattr(_tune, "_best", {})           # "another process", where timing now prefers another tile
    monkeypatch.setenv(_tune.ENV, "0")
    cost[Blocks(32, 32, 4)] = 0.1
    zigspark.tuning.use_tiles(table)
    ran = []
    assert _tune.launch("k", ("a", 64), CANDIDATES, ran.append, torch.device("meta")) == Blocks(128, 64, 8)
    assert ran == [Blocks(128, 64, 8)] and len(timed) == 3
    assert _tune.launch("k", ("b", 64), CANDIDATES, ran.append, DEVICE) == CANDIDATES[0]   # not in the table


def test_a_loaded_tile_the_kernel_no_longer_lists_is_passed_over(tuning):
    _, timed = tuning
    zigspark.tuning.use_tiles({"k a": "256x256 w16 s5"})
    assert _tune.launch("k", ("a",), CANDIDATES, lambda b: None, DEVICE) == Blocks(128, 64, 8)
    assert len(timed) == 3


def test_tiles_saved_to_a_file_load_back_and_from_the_environment(tuning, monkeypatch, tmp_path):
    _, timed = tuning
    _tune.launch("k", ("a",), CANDIDATES, lambda b: None, DEVICE)
    path = tmp_path / "tiles.json"
    zigspark.tuning.save_tiles(str(path))
    monkeypatch.setattr(_tune, "_best", {})
    monkeypatch.setenv(_tune.TILES_ENV, str(path))
    monkeypatch.setattr(_tune, "_env_loaded", False)    # the environment is read at a process's first launch
    assert _tune.launch("k", ("a",), CANDIDATES, lambda b: None, DEVICE) == Blocks(128, 64, 8)
    assert len(timed) == 3
    monkeypatch.setattr(_tune, "_loaded", {})
    zigspark.tuning.load_tiles(str(path))
    assert _tune._loaded == {"k a": Blocks(128, 64, 8)}


def test_bad_tile_tables_say_what_is_wrong(tuning, tmp_path):
    with pytest.raises(ValueError, match="is not spelled 'MxN wW sS'"):
        zigspark.tuning.use_tiles({"k a": "64 by 64"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tuned tiles from .*save_tiles"):
        zigspark.tuning.load_tiles(str(bad))
    with pytest.raises(ValueError, match="cannot read tuned tiles"):
        zigspark.tuning.load_tiles(str(tmp_path / "missing.json"))
