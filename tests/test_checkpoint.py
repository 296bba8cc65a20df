"""Checkpoint I/O: our safetensors reader/writer against the `safetensors` package, and the atomic save
protocol of zigspark.train.checkpoint (a crash at any point keeps a loadable checkpoint)."""

import json
import os

import pytest
import torch

from zigspark.train import checkpoint as ckpt
from zigspark.train import safetensors_io

pytestmark = pytest.mark.cpu

safetensors_torch = pytest.importorskip("safetensors.torch")


def _assorted_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.f64": torch.randn(7, generator=g, dtype=torch.float64),
        "w.f16": torch.randn(2, 3, 4, generator=g).half(),
        "w.bf16": torch.randn(9, generator=g).bfloat16(),
        "i64": torch.randint(-2**40, 2**40, (4,), generator=g),
        "i32": torch.randint(-100, 100, (3, 1), generator=g, dtype=torch.int32),
        "i16": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],      # non-contiguous input
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(5, generator=g).to(torch.float8_e4m3fn)
    return tensors


def _bits(t):
    """float8 has no torch.equal kernel on the CPU: compare its bytes."""
    return t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), name


def test_our_files_load_with_the_safetensors_package(tmp_path):
    tensors = _assorted_tensors()
    safetensors_io.save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt", "k": "v"})
    theirs = safetensors_torch.load_file(tmp_path / "ours.safetensors")
    _assert_same(theirs, {k: v.contiguous() for k, v in tensors.items()})
    from safetensors import safe_open
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_safetensors_package_files_load_with_ours(tmp_path):
    tensors = {k: v.contiguous() for k, v in _assorted_tensors().items()}
    safetensors_torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"a": "b"})
    ours, metadata = safetensors_io.load_file_with_metadata(tmp_path / "theirs.safetensors")
    _assert_same(ours, tensors)
    assert metadata == {"a": "b"}


def test_bytes_equal_the_reference_writer(tmp_path):
    """Same layout choices as the reference (alignment order, padding): the files are byte-identical."""
    tensors = {"b": torch.randn(3, 4), "a": torch.arange(5), "c": torch.randn(2).half()}
    safetensors_io.save_file(tensors, tmp_path / "ours.safetensors")
    safetensors_torch.save_file(tensors, tmp_path / "theirs.safetensors")
    ours, theirs = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "theirs.safetensors").read_bytes()
    header_len = int.from_bytes(ours[:8], "little")
    assert header_len % 8 == 0
    assert json.loads(ours[8:8 + header_len]) == json.loads(theirs[8:8 + int.from_bytes(theirs[:8], "little")])
    assert ours[8 + header_len:] == theirs[8 + int.from_bytes(theirs[:8], "little"):]


def test_corrupt_files_give_clear_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors_io.save_file({"w": torch.randn(100)}, path)
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="corrupt"):
        safetensors_io.load_file(tmp_path / "short.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_io.load_file(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((5).to_bytes(8, "little") + b"nojsn")
    with pytest.raises(ValueError, match="not JSON"):
        safetensors_io.load_file(tmp_path / "junk.safetensors")
    with pytest.raises(TypeError, match="metadata must map str to str"):
        safetensors_io.save_file({"w": torch.ones(1)}, path, metadata={"step": 3})
    with pytest.raises(TypeError, match="complex64"):
        safetensors_io.save_file({"w": torch.ones(1, dtype=torch.complex64)}, path)


def _save(directory, seed, **extra):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(directory, model=model, config={"model": {"width": 4}, "seed": seed},
                         ema={k: v * 0.5 for k, v in model.state_dict().items()}, optimizer=opt,
                         state={"step": seed, "rng": torch.Generator().manual_seed(seed).get_state(),
                                "losses": [1.0, 0.5]}, **extra)
    return model


def test_round_trip(tmp_path):
    directory = tmp_path / "run"
    assert not ckpt.has_checkpoint(directory)
    model = _save(directory, 7)
    assert ckpt.has_checkpoint(directory)
    assert sorted(os.listdir(directory)) == sorted(ckpt.CHECKPOINT_FILES)
    c = ckpt.load_checkpoint(directory)
    assert c.config == {"model": {"width": 4}, "seed": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(c.model_state[k], v)
        assert torch.equal(c.ema_state[k], v * 0.5)
    assert c.state["step"] == 7 and c.state["losses"] == [1.0, 0.5]
    assert torch.equal(c.state["rng"], torch.Generator().manual_seed(7).get_state())
    assert c.optimizer_state["state"][0]["step"] == 1
    assert json.loads((directory / "state.json").read_text()) == {"step": 7, "losses": [1.0, 0.5]}
    # Only the checkpoint is left behind: no temporary or .old siblings.
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_missing_checkpoint_error_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*nothing: expected model.safetensors and "
                                                r"config.json; train with `zigspark train-generator --out"):
        ckpt.load_checkpoint(tmp_path / "nothing")


def test_refuses_to_replace_a_directory_of_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ValueError, match="holds files but no checkpoint"):
        _save(tmp_path, 1)
    assert (tmp_path / "mine.txt").read_text() == "precious"
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save_checkpoint(tmp_path / "x", model=torch.nn.Linear(1, 1), config={"bad": object()})


def test_other_files_in_the_checkpoint_directory_survive_a_save(tmp_path):
    directory = tmp_path / "run"
    _save(directory, 1)
    (directory / "grid.png").write_bytes(b"png")
    (directory / "samples").mkdir()
    (directory / "samples" / "a.npy").write_bytes(b"npy")
    _save(directory, 2)
    assert (directory / "grid.png").read_bytes() == b"png"
    assert (directory / "samples" / "a.npy").read_bytes() == b"npy"
    assert ckpt.load_checkpoint(directory).state["step"] == 2


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4])
def test_a_failure_midway_through_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    """Fail the n-th file write of the second save (model, ema, optimizer, state): version 1 still loads."""
    directory = tmp_path / "run"
    _save(directory, 1)
    calls = {"n": 0}
    real_save_file, real_torch_save = safetensors_io.save_file, ckpt._torch_save

    def count(real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == failing_call:
                real(*args, **kwargs)     # leave a complete-looking file behind, then die
                raise OSError("disk full (simulated)")
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(safetensors_io, "save_file", count(real_save_file))
    monkeypatch.setattr(ckpt, "_torch_save", count(real_torch_save))
    with pytest.raises(OSError, match="simulated"):
        _save(directory, 2)
    c = ckpt.load_checkpoint(directory)
    assert c.state["step"] == 1 and c.config["seed"] == 1
    monkeypatch.undo()
    _save(directory, 3)
    assert ckpt.load_checkpoint(directory).state["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_crash_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    """Die after DIR → .DIR.old and before the new version is renamed in: the old version is still read,
    and the next save puts things in order."""
    directory = tmp_path / "run"
    _save(directory, 1)
    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed between the renames (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(directory, 2)
    monkeypatch.undo()
    assert not directory.exists()                      # the window the protocol must survive
    assert ckpt.has_checkpoint(directory)
    assert ckpt.load_checkpoint(directory).state["step"] == 1
    _save(directory, 3)
    assert ckpt.load_checkpoint(directory).state["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_crash_after_the_swap_and_stale_temporaries_are_cleaned(tmp_path):
    directory = tmp_path / "run"
    _save(directory, 1)
    (tmp_path / ".run.old").mkdir()                         # as if step 4 had not run
    (tmp_path / ".run.old" / "model.safetensors").write_bytes(b"old")
    (tmp_path / ".run.tmp-deadbeef").mkdir()                # as if a writer had been killed
    assert ckpt.load_checkpoint(directory).state["step"] == 1
    _save(directory, 2)
    assert sorted(os.listdir(tmp_path)) == ["run"]
