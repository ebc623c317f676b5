"""fusedres.analysis (layer responses, lesions), the CIFAR-10 data helpers, the `responses` and
`lesion` commands and examples/train_cifar.py, at tiny sizes."""

from __future__ import annotations

import copy
import csv
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedres import analysis, cli, models
from fusedres.models.cifar_data import MEAN, STD, load_cifar10, synthetic_cifar10
from tests.conftest import assert_matches_reference, fused_backends, randomize_batchnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The C++ kernels when built, else the reference; pinned so that no test pays for auto's timing.
BACKEND = "native" if "native" in fused_backends("cpu") else "reference"


def _cifar(arch: str, **kwargs) -> nn.Module:
    model = models.build(arch, backend=BACKEND, **kwargs)
    randomize_batchnorm(model)
    return model.eval()


def _untouched(model: nn.Module) -> bool:
    """No hooks and no patched forward left behind."""
    return all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch", ["resnet20", "plain20"])
def test_layer_responses_are_the_bn_outputs_of_every_3x3_layer(arch):
    model = _cifar(arch)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        h = model.bn1(model.conv1(x))
        expected = {"bn1": h.std()}
        h = F.relu(h)
        for stage in ("layer1", "layer2", "layer3"):
            for i, block in enumerate(getattr(model, stage)):
                a = block.bn1(block.conv1(h))
                b = block.bn2(block.conv2(F.relu(a)))
                expected[f"{stage}.{i}.bn1"], expected[f"{stage}.{i}.bn2"] = a.std(), b.std()
                shortcut = 0 if arch.startswith("plain") else (h if block.downsample is None else block.downsample(h))
                h = F.relu(b + shortcut)
        logits = model(x)
    responses = analysis.layer_responses(model, x)
    assert list(responses) == list(expected) and len(responses) == 19
    for name, std in expected.items():
        assert responses[name] == pytest.approx(std.item(), rel=1e-5), name
    assert _untouched(model)
    with torch.no_grad():
        assert torch.equal(model(x), logits)


def test_layer_responses_skip_1x1_layers_and_projections():
    model = models.resnet50(num_classes=10, backend=BACKEND)
    randomize_batchnorm(model)
    responses = analysis.layer_responses(model.eval(), torch.randn(1, 3, 32, 32))
    assert len(responses) == 16 and all(name.endswith(".bn2") for name in responses)


def test_residual_blocks_in_forward_order():
    names = [name for name, _ in analysis.residual_blocks(models.resnet20())]
    assert names == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert analysis.residual_blocks(models.plain20()) == []


class _Projection(nn.Module):
    def __init__(self, projection: nn.Sequential) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.projection(x))


@pytest.mark.parametrize("case", ["identity", "option_a", "projection"])
def test_lesion_equals_the_network_without_that_branch(case):
    """Deleting block layer2.0 (downsampling) or layer2.1 (identity) by hand, against lesion()."""
    shortcut = "B" if case == "projection" else "A"
    model = _cifar("resnet20", shortcut=shortcut)
    name, index = ("layer2.1", 4) if case == "identity" else ("layer2.0", 3)
    by_hand = copy.deepcopy(model)
    stage, position = name.split(".")
    block = getattr(by_hand, stage)[int(position)]
    replacement = {
        "identity": nn.Identity(),
        "option_a": block.downsample,  # the block's input is non-negative: relu(pad(x)) == pad(x)
        "projection": _Projection(block.downsample),
    }[case]
    getattr(by_hand, stage)[int(position)] = replacement
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        intact = model(x)
        expected = by_hand(x)
        with analysis.lesion(model, [index]) as lesioned:
            got = lesioned(x)
            assert f"{name}.conv1.weight" not in lesioned.state_dict()
        with analysis.lesion(model, [name]):
            assert torch.equal(model(x), got)
        assert torch.equal(model(x), intact)
    assert_matches_reference(got, expected.double(), torch.float32)
    assert not torch.allclose(got, intact)
    assert f"{name}.conv1.weight" in model.state_dict()


def test_lesion_rejects_what_is_not_a_residual_block():
    model = models.resnet20()
    with pytest.raises(ValueError, match="not a residual block"):
        with analysis.lesion(model, ["layer1"]):
            pass


def test_lesion_sweep_error_and_logit_change():
    model = _cifar("resnet20")
    images, labels = synthetic_cifar10(16, "test")
    with torch.no_grad():
        intact_error = (model(images).argmax(1) != labels).float().mean().item()
    sweep = analysis.lesion_sweep(model, [(images[:8], labels[:8]), (images[8:], labels[8:])], k_max=3, samples=2)
    assert [r.deleted for r in sweep] == [0, 1, 2, 3]
    assert sweep[0].values == [pytest.approx(intact_error)] and sweep[0].metric == "error"
    assert all(len(r.values) == 2 and 0 <= r.min <= r.mean <= r.max <= 1 for r in sweep[1:])
    again = analysis.lesion_sweep(model, (images, labels), k_max=3, samples=2)
    assert [r.values for r in again] == [r.values for r in sweep]
    change = analysis.lesion_sweep(model, images, k_max=2, samples=2, seed=1)
    assert change[0].metric == "logit change" and change[0].values == [0.0]
    assert all(v > 0 for r in change[1:] for v in r.values)
    with pytest.raises(ValueError, match="k_max must be in 1..9"):
        analysis.lesion_sweep(model, images, k_max=10)


def test_lesion_sweep_draws_distinct_blocks_per_sample(monkeypatch):
    model = _cifar("resnet20")
    drawn: list[list[int]] = []
    real_lesion = analysis.lesion

    def recording_lesion(m, blocks):
        drawn.append(sorted(blocks))
        return real_lesion(m, blocks)

    monkeypatch.setattr(analysis, "lesion", recording_lesion)
    sweep = analysis.lesion_sweep(model, torch.randn(2, 3, 32, 32), k_max=9, samples=9)
    by_k = {k: [d for d in drawn if len(d) == k] for k in range(1, 10)}
    assert sorted(map(tuple, by_k[1])) == [(i,) for i in range(9)]  # every block once at k=1
    assert all(len(set(map(tuple, sets))) == len(sets) for sets in by_k.values())
    assert len(by_k[8]) == 9 and by_k[9] == [list(range(9))]  # C(9,9) = 1: the one set, once
    assert [len(r.values) for r in sweep] == [1] + [9] * 8 + [1]


def _write_fake_cifar(root: pathlib.Path, n: int = 6) -> tuple[np.ndarray, list[int]]:
    """The python-pickle layout of cifar-10-batches-py, with n random images per file."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return data, labels


def test_load_cifar10_reads_the_pickle_format(tmp_path):
    data, labels = _write_fake_cifar(tmp_path)
    images, got_labels = load_cifar10(tmp_path, "test")
    assert images.shape == (6, 3, 32, 32) and got_labels.tolist() == labels
    pixel = data[2].reshape(3, 32, 32)[1, 5, 7] / 255
    assert images[2, 1, 5, 7].item() == pytest.approx((pixel - MEAN[1]) / STD[1], rel=1e-5)
    assert load_cifar10(tmp_path / "cifar-10-batches-py", "train")[0].shape == (30, 3, 32, 32)


def test_synthetic_cifar10_is_learnable_and_deterministic():
    train_x, train_y = synthetic_cifar10(200, "train")
    test_x, test_y = synthetic_cifar10(100, "test")
    assert train_x.shape == (200, 3, 32, 32) and set(train_y.tolist()) <= set(range(10))
    assert torch.equal(synthetic_cifar10(200, "train")[0], train_x)
    assert not torch.equal(test_x, train_x[:100])
    # Class means of the training images classify the test images: the task is learnable.
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(10)]).flatten(1)
    predicted = (test_x.flatten(1) @ means.T - 0.5 * means.square().sum(1)).argmax(1)
    assert (predicted == test_y).float().mean() > 0.9


def _plot_written_or_explained(out: str, path: pathlib.Path) -> bool:
    return path.exists() or "matplotlib is not installed" in out


def test_cli_responses(tmp_path, capsys):
    plot = tmp_path / "responses.png"
    assert cli.main(["responses", "--models", "resnet20", "plain20", "--samples", "4", "--device", "cpu",
                     "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "resnet20, plain20 (random weights) on cpu; 4 synthetic test images" in out
    rows = [line for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert len(rows) == 19 and rows[0].split()[1] == "bn1" and len(rows[-1].split()) == 4
    assert _plot_written_or_explained(out, plot)


def test_cli_lesion_with_weights_and_data(tmp_path, capsys):
    _write_fake_cifar(tmp_path)
    weights = tmp_path / "resnet20.pt"
    torch.save(_cifar("resnet20").state_dict(), weights)
    plot = tmp_path / "lesion.png"
    assert cli.main(["lesion", "--models", "resnet20", "--weights", str(weights), "--data", str(tmp_path),
                     "--k-max", "2", "--draws", "2", "--device", "cpu", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "resnet20 (weights from --weights) on cpu; 6 CIFAR-10 test images" in out
    assert "error with k random residual blocks deleted (2 distinct draws each)" in out
    assert [line.split()[0] for line in out.splitlines() if line[:3].strip().isdigit()] == ["0", "1", "2"]
    assert _plot_written_or_explained(out, plot)


def test_cli_lesion_defaults_run_on_the_smallest_model(tmp_path, capsys):
    # resnet20 has 9 residual blocks: the default --k-max (10) is capped, not rejected
    assert cli.main(["lesion", "--models", "resnet20", "--samples", "4", "--draws", "2", "--device", "cpu",
                     "--plot", str(tmp_path / "lesion.png")]) == 0
    out = capsys.readouterr().out
    assert "the weights are untrained" in out and "metric: relative change of the logits" in out
    assert "logit change with k random residual blocks deleted" in out
    assert [line.split()[0] for line in out.splitlines() if line[:3].strip().isdigit()] == [str(k) for k in range(10)]


def test_cli_offers_the_trained_weights_of_the_example(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "resnet20").mkdir(parents=True)
    torch.save(models.resnet20().state_dict(), tmp_path / "runs" / "resnet20" / "weights.pt")
    assert cli.main(["responses", "--models", "resnet20", "--samples", "2", "--device", "cpu",
                     "--plot", str(tmp_path / "r.png")]) == 0
    assert "--weights runs/resnet20/weights.pt" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--weights", "--data"])
def test_cli_explains_a_missing_file_in_one_line(tmp_path, flag):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exc:
        cli.main(["lesion", "--models", "resnet20", flag, missing, "--samples", "2", "--device", "cpu"])
    message = str(exc.value.code)
    assert message.startswith(f"python -m fusedres: error: {flag}: {missing}") and "\n" not in message


def test_cli_lesion_lists_only_residual_models(capsys):
    with pytest.raises(SystemExit):
        cli.main(["lesion", "--models", "plain20"])
    assert "invalid choice: 'plain20'" in capsys.readouterr().err


def test_example_trains_one_epoch_on_synthetic_data(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_cifar.py"), "--model", "resnet20", "--epochs", "1",
         "--synthetic-size", "64", "--batch-size", "32", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert 0 <= float(rows[0]["train_error"]) <= 1 and 0 <= float(rows[0]["test_error"]) <= 1
    models.resnet20().load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert "epoch 1/1 [" in result.stderr
