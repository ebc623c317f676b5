"""Analyses of residual networks: layer responses (He et al. 2015, section 4.2, Fig. 7) and
lesion studies (Veit et al. 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks").

Both work on fusedres models and on torchvision's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from fusedres.nn.blocks import BasicBlock, Bottleneck

Batch = tuple[torch.Tensor, torch.Tensor | None]


def _residual_block_types() -> tuple[type, ...]:
    try:
        from torchvision.models import resnet
    except ImportError:
        return (BasicBlock, Bottleneck)
    return (BasicBlock, Bottleneck, resnet.BasicBlock, resnet.Bottleneck)


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of every residual block of ``model``, in forward order."""
    kinds = _residual_block_types()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[nn.Module]:
    """Run every fused module of ``model`` through its ``forward_unfused`` while active.

    The fused path reads the BatchNorm parameters without calling the BatchNorm modules, so
    their forward hooks only fire on the unfused path.
    """
    patched = [m for m in model.modules() if callable(getattr(m, "forward_unfused", None))]
    for m in patched:
        m.forward = m.forward_unfused
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


@torch.no_grad()
def layer_responses(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The std of each 3x3 layer's response to the batch ``x``, after BN and before the ReLU or
    the addition (the paper's Fig. 7), keyed by the BatchNorm's qualified name, in forward order.

    The std is over the whole response tensor (batch, channels, positions). The model runs in
    its current mode: call ``model.eval()`` first for the paper's setting (in train mode the
    running statistics are updated).
    """
    responses: dict[str, float] = {}
    last_conv: list[nn.Conv2d] = []

    def remember_conv(conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        last_conv[:] = [conv]

    def record(name: str) -> Callable:
        def hook(bn: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            # A BN belongs to the conv that ran just before it; projection shortcuts are 1x1.
            if last_conv and tuple(last_conv[0].kernel_size) == (3, 3):
                responses[name] = output.float().std().item()
        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(remember_conv))
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            handles.append(m.register_forward_hook(record(name)))
    try:
        with unfused(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return responses


class BranchDeleted(nn.Module):
    """A residual block with its residual branch deleted: ``y = relu(shortcut(x))``.

    This is the block with the branch's output set to zero. For identity shortcuts (and option A)
    it is ``y = x``, Veit et al.'s deletion, since the block's input comes out of a ReLU; for a
    projection shortcut the ReLU keeps the block's output non-negative, as the next block expects.
    The shortcut module is shared with the original block.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.downsample = block.downsample
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x if self.downsample is None else self.downsample(x))


@contextlib.contextmanager
def lesion(model: nn.Module, blocks: Iterable[int | str]) -> Iterator[nn.Module]:
    """``model`` with the residual branches of ``blocks`` deleted while active (see
    :class:`BranchDeleted`). ``blocks`` are indices into :func:`residual_blocks` or qualified
    names; the original blocks are put back on exit.
    """
    named = residual_blocks(model)
    by_name = dict(named)
    chosen = []
    for b in blocks:
        name, block = named[b] if isinstance(b, int) else (b, by_name.get(b))
        if block is None:
            raise ValueError(f"{b!r} is not a residual block of the model")
        chosen.append((name, block))
    replaced = []
    try:
        for name, block in chosen:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child_name, BranchDeleted(block))
            replaced.append((parent, child_name, block))
        yield model
    finally:
        for parent, child_name, block in reversed(replaced):
            setattr(parent, child_name, block)


@dataclasses.dataclass
class LesionResult:
    """The metric for ``deleted`` random blocks removed, one value per random draw."""

    deleted: int
    metric: str  # "error" (top-1, a fraction) or "logit change" (mean |dlogits| / |logits|)
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


def _batches(data: torch.Tensor | Batch | Iterable[torch.Tensor | Sequence[torch.Tensor]]) -> list[Batch]:
    if isinstance(data, torch.Tensor):
        return [(data, None)]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor) and (
            data[1] is None or isinstance(data[1], torch.Tensor)):
        return [data]
    return [(batch, None) if isinstance(batch, torch.Tensor) else (batch[0], batch[1] if len(batch) > 1 else None)
            for batch in data]


@torch.no_grad()
def lesion_sweep(
    model: nn.Module,
    data: torch.Tensor | Batch | Iterable[torch.Tensor | Sequence[torch.Tensor]],
    k_max: int,
    samples: int = 5,
    seed: int = 0,
) -> list[LesionResult]:
    """Delete k = 1..``k_max`` random residual blocks, ``samples`` distinct random sets of k
    blocks each (seeded; all sets where fewer exist, e.g. the one set at k = all blocks), and
    measure the model on ``data``: top-1 error when every batch has labels, otherwise the mean
    over images of ``|logits - intact logits| / |intact logits|``.

    ``data`` is an image tensor, an ``(images, labels)`` pair or an iterable of either (a
    ``DataLoader``). Returns one result per k, from k = 0 (the intact model).
    """
    blocks = residual_blocks(model)
    if not 1 <= k_max <= len(blocks):
        raise ValueError(f"k_max must be in 1..{len(blocks)} (the model's residual blocks), got {k_max}")
    batches = _batches(data)
    device = next(model.parameters()).device
    batches = [(x.to(device), None if y is None else y.to(device)) for x, y in batches]
    labelled = all(y is not None for _, y in batches)
    intact = [] if labelled else [model(x) for x, _ in batches]

    def measure() -> float:
        logits = [model(x) for x, _ in batches]
        if labelled:
            wrong = sum((out.argmax(1) != y).sum().item() for out, (_, y) in zip(logits, batches))
            return wrong / sum(len(y) for _, y in batches)
        change = torch.cat([(out - ref).norm(dim=1) / ref.norm(dim=1) for out, ref in zip(logits, intact)])
        return change.mean().item()

    metric = "error" if labelled else "logit change"
    results = [LesionResult(0, metric, [measure()])]
    rng = random.Random(seed)
    for k in range(1, k_max + 1):
        values = []
        for chosen in _distinct_subsets(rng, len(blocks), k, samples):
            with lesion(model, chosen):
                values.append(measure())
        results.append(LesionResult(k, metric, values))
    return results


def _distinct_subsets(rng: random.Random, n: int, k: int, count: int) -> list[list[int]]:
    """``count`` distinct random k-subsets of range(n) (all of them when there are fewer)."""
    if math.comb(n, k) <= count:
        return [list(c) for c in itertools.combinations(range(n), k)]
    seen: set[tuple[int, ...]] = set()
    subsets = []
    while len(subsets) < count:
        chosen = tuple(sorted(rng.sample(range(n), k)))
        if chosen not in seen:
            seen.add(chosen)
            subsets.append(list(chosen))
    return subsets


def plot_responses(responses: dict[str, dict[str, float]], path: str, weights: str = "") -> None:
    """The paper's Fig. 7 for each model's :func:`layer_responses`: std by layer index, and
    sorted by magnitude; ``weights`` (e.g. "random (untrained) weights") goes into the title.
    Needs matplotlib (raises ImportError without it)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 6), layout="constrained")
    by_index, by_size = fig.subplots(2, 1)
    for model_name, stds in responses.items():
        values = list(stds.values())
        layers = range(1, len(values) + 1)
        by_index.plot(layers, values, marker=".", label=model_name)
        by_size.plot(layers, sorted(values, reverse=True), marker=".", label=model_name)
    fig.suptitle("Std of each 3x3 layer's response, after BN and before ReLU/addition\n"
                 f"(He et al. 2015, Fig. 7){': ' + weights if weights else ''}", fontsize=10)
    by_index.set(xlabel="layer index (original)", ylabel="std", title="in network order")
    by_size.set(xlabel="layer index (sorted by magnitude)", ylabel="std", title="sorted by magnitude")
    for ax in (by_index, by_size):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(title="model (one dot per layer)", fontsize=8)
    fig.savefig(path, dpi=120)


def plot_lesion_sweep(sweeps: dict[str, list[LesionResult]], path: str, weights: str = "") -> None:
    """Mean (with min-max band) of each model's :func:`lesion_sweep` against the number of deleted
    blocks; ``weights`` goes into the title. Needs matplotlib (raises ImportError without it)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    draws = max(len(r.values) for results in sweeps.values() for r in results)
    for model_name, results in sweeps.items():
        ks = [r.deleted for r in results]
        line, = ax.plot(ks, [r.mean for r in results], marker="o", label=f"{model_name}: mean over draws")
        ax.fill_between(ks, [r.min for r in results], [r.max for r in results], alpha=0.2,
                        color=line.get_color(), label=f"{model_name}: min to max over draws")
    metric = next(iter(sweeps.values()))[0].metric
    ax.set(xlabel="residual blocks deleted (k)", ylabel=metric,
           title=f"Lesion study (Veit et al. 2016): {metric} with k random residual\nblocks deleted, "
                 f"up to {draws} distinct sets per k{'; ' + weights if weights else ''}")
    ax.title.set_fontsize(10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
