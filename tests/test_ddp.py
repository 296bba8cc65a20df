"""Data-parallel generator training: two Gloo processes on the CPU, launched the way torchrun launches them
(RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, env:// initialisation).

The two replicas start from different random weights on purpose: DDP must broadcast rank 0's, keep the
replicas bitwise identical, and give the losses of one process training on the same global batch.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cpu

STEPS, BATCH = 3, 8
NARROW = {"width": 32, "depth": 2, "d_state": 4}
TRAIN = {"steps": STEPS, "batch_size": BATCH, "lr": 3e-3, "log_every": 1, "seed": 0}


def _model(seed):
    from zigspark.models import ZigMa, zigma_config

    torch.manual_seed(seed)
    return ZigMa(**zigma_config("tiny", 8, 1, num_classes=10, **NARROW))


def _worker(out: Path, device: str) -> None:
    """One rank: join the group from the environment, train, save what it ended with."""
    from zigspark.data import ImageSet
    from zigspark.train import distributed
    from zigspark.train.generator import train_generator

    torch.set_num_threads(1)
    ctx = distributed.init_distributed(device)
    assert ctx.distributed and ctx.world_size == 2 and ctx.device.type == device
    data = ImageSet(**torch.load(out / "data.pt"))         # the parent's images: no scikit-learn import here
    result = train_generator(data, _model(seed=100 + ctx.rank), device=device, amp="none", out_dir=out / "ckpt",
                             **TRAIN)
    torch.save({"losses": result.losses, "state": result.model.state_dict(), "ema": result.ema.state_dict()},
               out / f"rank{ctx.rank}.pt")
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_two_ranks_match_one_process(tmp_path: Path, data, device: str) -> None:
    """Launch two ranks on `device` as torchrun would, train one process alike meanwhile, compare.
    (Shared with the gpu tier, which runs it with NCCL on two GPUs.)"""
    from zigspark.train.generator import train_generator

    torch.save({"images": data.images, "labels": data.labels, "num_classes": data.num_classes, "name": data.name},
               tmp_path / "data.pt")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path), device],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]

    # Meanwhile, the single-process run on the same global batches.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_generator(data, _model(seed=100), device=device, amp="none", progress=None, **TRAIN)
    finally:
        torch.set_num_threads(threads)

    outputs = [p.communicate(timeout=120) for p in procs]
    for rank, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{stdout}\n{stderr}"
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", map_location="cpu") for r in range(2))

    for name, value in rank0["state"].items():       # replicas identical, bit for bit
        assert torch.equal(value, rank1["state"][name]), name
        assert torch.equal(rank0["ema"][name], rank1["ema"][name]), name
    assert rank0["losses"] == rank1["losses"]          # the logged loss is the mean over ranks
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0["state"][name], value.cpu(), rtol=1e-4, atol=1e-5, msg=name)

    # Only rank 0 prints and writes the checkpoint.
    assert f"step {STEPS}/{STEPS}" in outputs[0][0] and "per rank x 2" in outputs[0][0]
    assert outputs[1][0].strip() == ""
    from zigspark.train.checkpoint import load_checkpoint
    ck = load_checkpoint(tmp_path / "ckpt")
    assert ck.state["step"] == STEPS and ck.config["training"]["world_size"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "data.pt", "rank0.pt", "rank1.pt"]


def test_two_gloo_ranks_match_one_process(tmp_path):
    from zigspark.data import load_images

    check_two_ranks_match_one_process(tmp_path, load_images("digits", split="train"), "cpu")


def test_batch_must_split_evenly_over_ranks(monkeypatch):
    from zigspark.data import load_images
    from zigspark.train import distributed
    from zigspark.train.generator import train_generator

    monkeypatch.setattr(distributed, "current_context",
                        lambda device_type=None: distributed.DistContext(rank=0, world_size=3))
    with pytest.raises(ValueError, match="batch_size 8 must be divisible by the number of processes \\(3\\)"):
        train_generator(load_images("digits", split="train"), _model(0), steps=1, batch_size=8, progress=None)


def test_single_process_context_without_torchrun(monkeypatch):
    from zigspark.train import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_distributed("cpu")
    assert not ctx.distributed and ctx.is_main and ctx.device == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK is not set: launch with torchrun"):
        distributed.init_distributed("cpu")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
