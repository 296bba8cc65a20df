"""Generator training on CUDA: bf16 autocast, the CUDA noise generator through a checkpoint and resume,
sampling from the command line, and NCCL data parallelism where two GPUs exist.

The data are synthetic (the GPU machine has no scikit-learn): class k draws a bright bar in row k of an
8×8 image, so a few dozen steps visibly lower the loss.
"""

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def bars(n=512, num_classes=8, seed=0):
    from zigspark.data import ImageSet

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.full((n, 1, 8, 8), -1.0)
    images[torch.arange(n), 0, labels] = 1.0
    images = (images + 0.1 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    return ImageSet(images=images, labels=labels, num_classes=num_classes, name="bars")


def test_bf16_training_resume_and_sampling_on_cuda(tmp_path):
    from zigspark.cli import main
    from zigspark.models import ZigMa, zigma_config
    from zigspark.train.checkpoint import load_checkpoint
    from zigspark.train.generator import train_generator

    data = bars()

    def model():
        torch.manual_seed(0)
        return ZigMa(**zigma_config("tiny", 8, 1, num_classes=data.num_classes))

    kwargs = {"batch_size": 64, "lr": 2e-3, "out_dir": tmp_path / "run", "device": "cuda", "progress": None,
              "log_every": 10}
    first = train_generator(data, model(), steps=40, **kwargs)
    assert first.config["training"]["amp"] == "bf16"
    assert all(math.isfinite(v) for v in first.losses)
    assert np.mean(first.losses[-5:]) < 0.8 * np.mean(first.losses[:5]), first.losses

    ck = load_checkpoint(tmp_path / "run")                    # loads on the CPU
    assert ck.state["noise_device"] == "cuda" and ck.state["step"] == 40
    resumed = train_generator(data, model(), steps=50, **kwargs)
    assert resumed.start_step == 40 and resumed.losses[:40] == first.losses and len(resumed.losses) == 50

    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--num", "16", "--steps", "8", "--cfg", "2",
                 "--labels", "all", "--device", "cuda", "--out", str(grid)]) == 0
    images = np.load(tmp_path / "grid.npy")
    assert images.shape == (16, 1, 8, 8) and np.isfinite(images).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallelism needs two GPUs")
def test_two_nccl_ranks_match_one_process(tmp_path):
    from test_ddp import check_two_ranks_match_one_process

    check_two_ranks_match_one_process(tmp_path, bars(), "cuda")
