"""Generator training (zigspark.train.generator), the weight EMA, and the train-generator / sample commands.

The model is the real ZigMa at the "tiny" named config, narrowed (width 32, depth 2, N = 4) so that a step
takes a fraction of a second on a 2-core CPU.
"""

import json
import math

import numpy as np
import pytest
import torch

from zigspark.cli import main
from zigspark.data import load_images
from zigspark.models import ZigMa, zigma_config
from zigspark.train.checkpoint import has_checkpoint, load_checkpoint
from zigspark.train.ema import EMA
from zigspark.train.generator import TrainingDiverged, flow_matching_batch, train_generator

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_thread")]

NARROW = {"width": 32, "depth": 2, "d_state": 4}
NARROW_ARGS = ["--width", "32", "--depth", "2", "--d-state", "4"]




@pytest.fixture(scope="module")
def digits():
    return load_images("digits", split="train")


def tiny_zigma(seed=0, num_classes=10):
    torch.manual_seed(seed)
    return ZigMa(**zigma_config("tiny", 8, 1, num_classes=num_classes, **NARROW))


def quiet(**kwargs):
    return {"progress": None, "batch_size": 16, "lr": 3e-3, **kwargs}


def fixed_batch_loss(model, data, n=64):
    """The flow-matching loss on a fixed batch with fixed t and ε (no label dropout)."""
    g = torch.Generator().manual_seed(123)
    x0, y = data.images[:n], data.labels[:n]
    t = torch.rand(n, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t_ = t.view(-1, 1, 1, 1)
    with torch.no_grad():
        return torch.mean((model((1 - t_) * x0 + t_ * eps, t, y) - (eps - x0)) ** 2).item()


# ---- the EMA ------------------------------------------------------------------------------------------------

def test_ema_follows_the_formula():
    model = torch.nn.Linear(3, 2)
    model.register_buffer("counter", torch.zeros(()))
    ema = EMA(model, decay=0.9, warmup=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.counter += 1
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        for name in ("weight", "bias"):
            expected[name] = d * expected[name] + (1 - d) * model.state_dict()[name]
        expected["counter"] = model.counter.clone()         # buffers are copied, not averaged
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[name])
    target = torch.nn.Linear(3, 2)
    target.register_buffer("counter", torch.zeros(()))
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, expected["weight"])
    assert ema.extra_state() == {"decay": 0.9, "warmup": True, "num_updates": 5}


def test_ema_without_warmup_and_restore():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()
    torch.testing.assert_close(ema.state_dict()["weight"], start + 1.0)
    other = EMA(model, decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict(), num_updates=ema.num_updates)
    assert torch.equal(other.state_dict()["weight"], ema.state_dict()["weight"]) and other.num_updates == 1
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(model, decay=1.0)
    with pytest.raises(ValueError, match="does not match the model"):
        other.load_state_dict({"weight": torch.zeros(2, 2)})


# ---- training ---------------------------------------------------------------------------------------------

def test_flow_matching_batch_is_the_linear_interpolant_and_slices_like_ddp(digits):
    idx = torch.tensor([5, 0, 17, 3, 99, 42])
    model = tiny_zigma()

    def draw(mine=slice(None)):
        noise = torch.Generator().manual_seed(7)
        return flow_matching_batch(digits.images, digits.labels, idx, noise, drop_labels=model.drop_labels,
                                   mine=mine)

    x_t, t, y, target = draw()
    t_ = t.view(-1, 1, 1, 1)
    assert ((0 <= t) & (t <= 1)).all()
    torch.testing.assert_close(x_t - t_ * target, digits.images[idx])        # x₀ = x_t − t·v
    assert (x_t + (1 - t_) * target).std() > 0.5                           # ε = x_t + (1 − t)·v, noise
    assert ((y == digits.labels[idx]) | (y == 10)).all()
    halves = [draw(slice(0, 3)), draw(slice(3, 6))]                        # two ranks, same draws
    for full, *parts in zip((x_t, t, y, target), *halves):
        assert torch.equal(torch.cat(parts), full)


def test_ten_steps_reduce_the_loss(digits):
    model = tiny_zigma()
    before = fixed_batch_loss(model, digits)
    result = train_generator(digits, model, steps=10, **quiet(batch_size=32, lr=5e-3))
    after = fixed_batch_loss(result.model, digits)
    assert len(result.losses) == 10 and result.step == 10
    assert after < 0.85 * before, (before, after)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert result.images_per_s > 0


def test_resume_continues_the_same_trajectory_bitwise(digits, tmp_path):
    straight = train_generator(digits, tiny_zigma(), steps=10, out_dir=tmp_path / "a", **quiet())
    first = train_generator(digits, tiny_zigma(), steps=5, out_dir=tmp_path / "b", **quiet())
    assert load_checkpoint(tmp_path / "b").state["step"] == 5
    # A fresh process would build a freshly initialised model: resuming must not depend on its weights.
    resumed = train_generator(digits, tiny_zigma(seed=99), steps=10, out_dir=tmp_path / "b", **quiet())
    assert resumed.start_step == 5
    assert first.losses == straight.losses[:5]
    assert resumed.losses == straight.losses                  # bitwise: lists of Python floats
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
        assert torch.equal(resumed.ema.state_dict()[name], straight.ema.state_dict()[name]), name
    # Asking for fewer steps than are done trains nothing.
    again = train_generator(digits, tiny_zigma(), steps=8, out_dir=tmp_path / "b", **quiet())
    assert again.step == 10 and again.losses == straight.losses


def test_resume_refuses_a_different_batch_or_model(digits, tmp_path):
    train_generator(digits, tiny_zigma(), steps=1, out_dir=tmp_path, **quiet())
    with pytest.raises(ValueError, match="batch_size=16, now batch_size=8"):
        train_generator(digits, tiny_zigma(), steps=2, out_dir=tmp_path, **quiet(batch_size=8))
    torch.manual_seed(0)
    other = ZigMa(**zigma_config("tiny", 8, 1, num_classes=10, width=16, depth=2, d_state=4))
    with pytest.raises(ValueError, match="checkpoint of a different model"):
        train_generator(digits, other, steps=2, out_dir=tmp_path, **quiet())


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    model = tiny_zigma()
    calls = {"n": 0}

    def poison_at_step_5(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    model.register_forward_hook(poison_at_step_5)
    lines = []
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5; the last good checkpoint \(step 4\) is "
                                               r"kept in .*; lower the learning rate") as info:
        train_generator(digits, model, steps=10, out_dir=tmp_path, checkpoint_every=2, log_every=3,
                        **quiet(progress=lines.append))
    assert info.value.step == 5 and info.value.last_good_step == 4
    assert any(line.startswith("step 3/10") for line in lines)
    kept = load_checkpoint(tmp_path)
    assert kept.state["step"] == 4 and len(kept.state["losses"]) == 4
    assert torch.isfinite(kept.state["losses"]).all()
    assert all(torch.isfinite(v).all() for v in kept.model_state.values())


def test_non_finite_weights_are_never_checkpointed(digits, tmp_path):
    model = tiny_zigma()
    calls = {"n": 0}

    def poison_gradients_at_step_3(module, grad_input, grad_output):
        calls["n"] += 1
        if calls["n"] == 3:
            return tuple(g * float("inf") if g is not None else None for g in grad_input)

    model.final.register_full_backward_hook(poison_gradients_at_step_3)
    with pytest.raises(TrainingDiverged, match=r"(weights became non-finite after step 3|loss is nan at step 4)"):
        train_generator(digits, model, steps=6, out_dir=tmp_path, checkpoint_every=3, **quiet())
    assert not has_checkpoint(tmp_path)


def test_bad_arguments(digits):
    model = tiny_zigma()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_generator(digits, model, steps=0, **quiet())
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        train_generator(digits, model, steps=1, **quiet(lr=float("inf")))
    with pytest.raises(ValueError, match="amp='bf16' autocasts on CUDA only"):
        train_generator(digits, model, steps=1, amp="bf16", device="cpu", **quiet())
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        train_generator(digits, model, steps=1, time_sampling="beta", **quiet())
    unlabelled = load_images("digits", split="train")
    unlabelled.labels = None
    with pytest.raises(ValueError, match="class-conditional .* but the data has no labels"):
        train_generator(unlabelled, model, steps=1, **quiet())
    with pytest.raises(ValueError, match=r"data must have .images"):
        train_generator(torch.randn(4, 1, 8, 8), model, steps=1, **quiet())


def test_unconditional_logit_normal_training_runs(digits):
    result = train_generator(digits, tiny_zigma(num_classes=0), steps=2, time_sampling="logit_normal", **quiet())
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)


# ---- the commands -----------------------------------------------------------------------------------------

def test_train_then_sample_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-generator", "--data", "digits", "--config", "tiny", *NARROW_ARGS, "--steps", "3",
            "--batch-size", "8", "--log-every", "1", "--out", str(out), "--seed", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "step 3/3  loss" in printed and "img/s" in printed and "ETA" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_class"] == "ZigMa" and config["model"]["num_classes"] == 10
    assert config["training"]["batch_size"] == 8 and config["run"]["data"] == "digits"

    assert main([*args[:args.index("--steps")], "--steps", "4", *args[args.index("--steps") + 2:]]) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    assert load_checkpoint(out).state["step"] == 4

    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(out), "--num", "6", "--steps", "2", "--cfg", "2.0",
                 "--solver", "heun", "--labels", "0,3", "--out", str(grid)]) == 0
    assert grid.is_file() and grid.stat().st_size > 0
    images = np.load(tmp_path / "grid.npy")
    assert images.shape == (6, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    assert np.load(tmp_path / "grid.labels.npy").tolist() == [0, 3, 0, 3, 0, 3]


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train-generator", *NARROW_ARGS, "--steps", "1", "--batch-size", "8", "--log-every", "1",
                 "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("argv, message", [
    (["sample", "--checkpoint", "{tmp}/none"], "no checkpoint in"),
    (["sample", "--checkpoint", "{run}", "--labels", "12"], "out of range"),
    (["sample", "--checkpoint", "{run}", "--out", "{tmp}/grid.jpg"], "--out must end in .png"),
    (["train-generator", "--data", "digitz", "--out", "{tmp}/x"], "unknown dataset 'digitz'"),
    (["train-generator", "--data", "digits", "--out", "{run}", *NARROW_ARGS, "--batch-size", "4", "--steps", "2"],
     "resuming needs the same batch_size"),
    (["train-generator", "--out", "{tmp}/y", "--lr", "0"], "lr must be a finite number > 0"),
])
def test_command_errors_are_one_line_and_exit_2(one_step_run, tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path, run=one_step_run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["train-generator"], ["train-generator", "--out", "x", "--steps", "-3"],
                                  ["sample", "--checkpoint", "x", "--solver", "rk4"],
                                  ["train-generator", "--out", "x", "--config", "XL"]])
def test_argparse_rejects_malformed_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err
