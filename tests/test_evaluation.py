"""zigspark.evaluation: Fréchet distance, class accuracy, the pruning table, the linear probe, and the
train-recognizer / eval-recognizer / probe commands, on tiny models and data."""

import json
import math

import numpy as np
import pytest
import torch

from zigspark import cli
from zigspark.data import ImageSet
from zigspark.evaluation import (accuracy, class_accuracy, evaluate_pruning, format_table, frechet_distance,
                                 linear_probe, recognizer_frechet, save_json)
from zigspark.evaluation.frechet import frechet_from_statistics
from zigspark.models import Recognizer, ZigMa, zigma_config
from zigspark.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.cpu


def with_exact_statistics(n, mean, cov, seed=0):
    """n samples whose sample mean and (unbiased) covariance are exactly `mean` and `cov`."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T      # sample covariance exactly I
    return z @ torch.linalg.cholesky(cov).T + mean


def bars(n=40, seed=0, size=4):
    """Two classes: a bright top row (0) or a bright bottom row (1) on a noisy dark background."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = -1.0 + 0.3 * torch.rand(n, 1, size, size, generator=g)
    x[labels == 0, :, 0] = 1.0
    x[labels == 1, :, size - 1] = 1.0
    return ImageSet(x, labels.long(), 2, "bars")


# ---- Fréchet distance -----------------------------------------------------------------------------------

def test_frechet_of_a_set_with_itself_is_zero():
    feats = torch.randn(200, 12, generator=torch.Generator().manual_seed(0)) @ torch.randn(12, 12)
    assert frechet_distance(feats, feats) < 1e-8
    assert frechet_distance(feats.numpy(), feats.clone()) < 1e-8


def test_frechet_of_shifted_gaussians_is_the_analytic_value():
    a, b = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    expected = shift.square().sum() + (a.sqrt() - b.sqrt()).square().sum()    # diagonal: Σ(√a − √b)²
    x = with_exact_statistics(300, torch.zeros(4, dtype=torch.float64), torch.diag(a).double(), seed=1)
    y = with_exact_statistics(500, shift.double(), torch.diag(b).double(), seed=2)
    assert frechet_distance(x, y) == pytest.approx(expected.item(), rel=1e-9)
    # the same covariances in a rotated basis (Σ₁, Σ₂ full but commuting): the distance is basis-free
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    assert frechet_from_statistics(shift.double() @ rotation.T, rotation @ torch.diag(a).double() @ rotation.T,
                                   torch.zeros(4), rotation @ torch.diag(b).double() @ rotation.T) == \
        pytest.approx(expected.item(), rel=1e-9)


def test_frechet_matches_the_textbook_sqrtm_for_non_commuting_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(4)
    s1, s2 = (m @ m.T + 0.1 * torch.eye(6) for m in torch.randn(2, 6, 6, generator=g).double())
    mu1, mu2 = torch.randn(2, 6, generator=g).double()
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    textbook = ((mu1 - mu2) @ (mu1 - mu2)).item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert frechet_from_statistics(mu1, s1, mu2, s2) == pytest.approx(textbook, rel=1e-8)


def test_frechet_with_fewer_samples_than_dimensions_stays_finite():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(5, 20, generator=g), torch.randn(7, 20, generator=g) + 1
    d = frechet_distance(x, y)
    assert math.isfinite(d) and d > 0


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="feature dimension"):
        frechet_distance(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((4, 3), float("nan")), torch.randn(4, 3))
    with pytest.raises(TypeError, match="feats_a"):
        frechet_distance([[1.0, 2.0]], torch.randn(4, 2))


# ---- recognizer metrics -----------------------------------------------------------------------------------

class BrightTop(torch.nn.Module):
    """A stub recognizer: class 0 if the top row is brighter than the bottom row, else class 1."""

    def forward(self, x, keep=None, strategy="hiprune", generator=None):
        score = x[:, 0, 0].mean(1) - x[:, 0, -1].mean(1)
        return torch.stack([score, -score], dim=1)


def test_class_accuracy_is_the_share_recognised_as_their_class():
    data = bars(10)
    assert class_accuracy(BrightTop(), data.images, data.labels) == 1.0
    wrong = data.labels.clone()
    wrong[:3] = 1 - wrong[:3]
    assert class_accuracy(BrightTop(), data.images, wrong) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(BrightTop(), data.images, wrong[:4])


def test_recognizer_frechet_of_real_against_real_and_noise():
    torch.manual_seed(0)
    model = Recognizer(image_size=4, channels=1, num_classes=2, width=16, depth=1, heads=2)
    data = bars(32)
    assert recognizer_frechet(model, data, data.images) < 1e-8
    noise = torch.rand(32, 1, 4, 4) * 2 - 1
    assert recognizer_frechet(model, data, noise, batch_size=7) > 1e-3


def test_evaluate_pruning_rows_table_and_json(tmp_path):
    torch.manual_seed(0)
    model = Recognizer(image_size=6, channels=1, num_classes=2, width=16, depth=2, heads=2)
    data = bars(12, size=6)
    rows = evaluate_pruning(model, data, keeps=(1.0, 1 / 3, 2), strategies=("hiprune", "random"), batch_size=5,
                            random_trials=2)
    assert [(r["tokens"], r["strategy"]) for r in rows] == [(36, "hiprune"), (36, "random"), (12, "hiprune"),
                                                            (12, "random"), (2, "hiprune"), (2, "random")]
    assert rows[0]["accuracy"] == rows[1]["accuracy"] and rows[-1]["trials"] == 2
    assert rows[2]["accuracy"] == accuracy(model, data.images, data.labels, keep=12)
    expected_random = sum(accuracy(model, data.images, data.labels, keep=2, strategy="random", seed=s)
                          for s in range(2)) / 2
    assert rows[-1]["accuracy"] == pytest.approx(expected_random)
    assert all(0 <= r["accuracy"] <= 1 and r["images_per_s"] > 0 for r in rows)
    table = format_table(rows, 36)
    assert table.splitlines()[0].startswith("| keep | tokens | strategy") and "| 33.3% | 12 | hiprune |" in table
    saved = json.loads(save_json(rows, tmp_path / "x" / "rows.json", model="tiny").read_text())
    assert saved["rows"] == rows and saved["model"] == "tiny"
    with pytest.raises(ValueError, match="strategies"):
        evaluate_pruning(model, data, strategies=("topk",))
    with pytest.raises(ValueError, match="no labels"):
        evaluate_pruning(model, ImageSet(data.images, None, 0, "x"))


# ---- linear probe -----------------------------------------------------------------------------------------

class StandIn(torch.nn.Module):
    """A generator stand-in with ZigMa's features signature: a fixed random projection of the pixels."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(16, 3 * 8, generator=torch.Generator().manual_seed(0)))
        self.calls = []

    def features(self, x, t, y, layer):
        self.calls.append((t.clone(), None if y is None else y.clone(), layer))
        return (x.flatten(1) @ self.proj).reshape(x.shape[0], 3, 8)


def test_probe_on_a_stand_in_sees_the_class_at_t0_and_not_in_pure_noise():
    train, test = bars(60, seed=0), bars(40, seed=1)
    stand_in = StandIn()
    clean = linear_probe(stand_in, (train, test), t=0.0, layer=2)
    assert clean["test_accuracy"] == 1.0 and clean["feature_dim"] == 8 and clean["train_size"] == 60
    t, y, layer = stand_in.calls[0]
    assert torch.all(t == 0.0) and torch.all(y == 2) and layer == 2         # null class, the asked layer
    noise = linear_probe(stand_in, (train, test), t=1.0, layer=2)
    assert noise["test_accuracy"] < 0.8
    logistic = linear_probe(stand_in, (train, test), t=0.0, layer=2, method="logistic", steps=50)
    assert logistic["test_accuracy"] == 1.0
    again = linear_probe(stand_in, (train, test), t=0.5, layer=2)
    assert again == linear_probe(stand_in, (train, test), t=0.5, layer=2)   # fixed-seed noise
    with pytest.raises(ValueError, match="t must be"):
        linear_probe(stand_in, (train, test), t=1.5)
    with pytest.raises(TypeError, match="data must be"):
        linear_probe(stand_in, train, t=0.5)


def active_tiny_zigma(seed=0):
    """A tiny ZigMa whose zero-initialised (adaLN-Zero) weights are drawn at random: untrained, its blocks
    would be the identity and its mean-pooled tokens a function of the mean pixel only."""
    torch.manual_seed(seed)
    generator = ZigMa(**zigma_config("tiny", image_size=4, channels=1, num_classes=2, width=16, depth=2,
                                     backend="reference"))
    with torch.no_grad():
        for p in generator.parameters():
            if (p == 0).all():
                p.normal_(0, 0.3)
    return generator


def test_probe_on_a_tiny_zigma():
    generator = active_tiny_zigma()
    train, test = bars(48, seed=0), bars(24, seed=1)
    result = linear_probe(generator, (train, test), t=0.2, layer=-1)
    assert result["feature_dim"] == 16 and result["test_accuracy"] == 1.0
    assert linear_probe(generator, (train, test), t=1.0, layer=-1)["test_accuracy"] < 0.8
    assert generator.training                              # the probe restores the mode it found


# ---- the commands -----------------------------------------------------------------------------------------

def write_bars_folder(root, n=24, size=4):
    from PIL import Image

    data = bars(n, size=size)
    for i, (x, y) in enumerate(zip(data.images, data.labels)):
        folder = root / f"class{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((x[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    return root


def test_cli_train_then_eval_recognizer_round_trip(tmp_path, capsys):
    folder = write_bars_folder(tmp_path / "bars")
    out = tmp_path / "rec"
    assert cli.main(["train-recognizer", "--data", str(folder), "--out", str(out), "--steps", "3",
                     "--batch-size", "8", "--width", "16", "--depth", "2", "--heads", "2", "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "test accuracy" in printed
    assert json.loads((out / "config.json").read_text())["run"]["data"] == str(folder)
    assert cli.main(["eval-recognizer", "--checkpoint", str(out), "--keep", "1.0", "0.5", "3",
                     "--strategy", "hiprune", "random", "--json", str(tmp_path / "rows.json")]) == 0
    printed = capsys.readouterr().out
    assert "| 50.0% | 8 | hiprune |" in printed and "| 18.8% | 3 | random |" in printed
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["keep"], r["tokens"], r["strategy"]) for r in rows][2:4] == [(0.5, 8, "hiprune"), (0.5, 8, "random")]
    # a second training run into the same directory must not silently replace the checkpoint
    assert cli.main(["train-recognizer", "--data", str(folder), "--out", str(out), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["eval-recognizer", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval-recognizer", "--checkpoint", str(tmp_path), "--keep", "0"])
    assert exc.value.code == 2 and "token count must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval-recognizer", "--checkpoint", str(tmp_path), "--keep", "1.5"])
    assert exc.value.code == 2
    assert cli.main(["train-recognizer", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                     "--steps", "1"]) == 2
    assert "train-recognizer: error" in capsys.readouterr().err
    torch.manual_seed(0)
    model = Recognizer(image_size=4, channels=1, num_classes=2, width=16, depth=1, heads=2)
    save_checkpoint(tmp_path / "rec", model=model, config={"kind": "recognizer", "model": model.config,
                                                           "run": {"data": "digits"}})
    assert cli.main(["eval-recognizer", "--checkpoint", str(tmp_path / "rec"), "--keep", "17"]) == 2
    assert "keep" in capsys.readouterr().err
    assert cli.main(["probe", "--generator", str(tmp_path / "rec")]) == 2
    assert "not a ZigMa generator checkpoint" in capsys.readouterr().err


def test_cli_probe_on_a_generator_checkpoint(tmp_path, capsys):
    folder = write_bars_folder(tmp_path / "bars", n=40)
    generator = active_tiny_zigma()
    save_checkpoint(tmp_path / "gen", model=generator, ema=generator,
                    config={"kind": "generator", "model_class": "ZigMa", "model": generator.config,
                            "data": {"name": str(folder)}})
    assert cli.main(["probe", "--generator", str(tmp_path / "gen"), "--t", "0.2", "--layer", "0",
                     "--json", str(tmp_path / "probe.json")]) == 0
    assert "test accuracy" in capsys.readouterr().out
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["layer"] == 0 and result["t"] == 0.2 and result["data"] == str(folder)
    assert result["test_accuracy"] >= 0.8
