"""Command line: ``python -m fusedres [check|info|responses|lesion]``.

``check`` (the default) converts a torchvision ResNet-50, checks its eval logits against the
unfused model on this machine's device and prints eager vs fusedres throughput. ``info`` says
what was built and which backends can run here, and why the others cannot. ``responses`` and
``lesion`` run the analyses of ``fusedres.analysis`` on CIFAR-10 models.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from fusedres import _extension, backends


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_info(args: argparse.Namespace) -> int:
    import fusedres

    print(f"fusedres {fusedres.__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f"  (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton {triton.__version__}" + ("  (TRITON_INTERPRET=1: kernels run in the interpreter)"
                                               if backends.triton_interpreted() else ""))
    except ImportError:
        print("triton: not installed")
    if _extension.loaded():
        kernels = "C++ CPU kernels and CUDA kernels" if _extension.with_cuda_kernels() else "C++ CPU kernels only (built without CUDA)"
        print(f"fusedres._C: loaded, {kernels}")
    else:
        print(f"fusedres._C: not loaded: {_extension.LOAD_ERROR}")
        print("  build it with `pip install --no-build-isolation .` (see README.md)")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print("GPU: none visible (torch.cuda.is_available() is False)")
    print(f"default backend: {backends.get_default_backend()}")
    for dev in devices:
        print(f"backends on {dev.type}:")
        for name in ("cuda", "triton", "reference"):
            reason = backends.unusable_reason(name, dev, torch.float32)
            print(f"  {name:<10} {'usable' if reason is None else 'unusable: ' + reason}")
        print(f"  auto times: {', '.join(backends.auto_candidates(dev, torch.float32))}")
    return 0


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _images_per_second(models: dict, x: torch.Tensor, iters: int) -> dict[str, float]:
    """Median images/s of each model, timed in interleaved rounds so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
            model(x)
        for i in range(iters):
            print(f"  round {i + 1}/{iters}", end="\r" if i + 1 < iters else "\n", flush=True)
            for name, model in models.items():
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    return {name: x.shape[0] / statistics.median(t) for name, t in times.items()}


def cmd_check(args: argparse.Namespace) -> int:
    try:
        import torchvision
    except ImportError:
        print("the check needs torchvision: pip install torchvision", file=sys.stderr)
        return 2
    import fusedres

    device = _device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    print(f"building ResNet-50 (random weights, random BatchNorm statistics) on {device}, {args.dtype}, "
          f"batch {args.batch}, {args.size}x{args.size}, channels_last")
    eager = torchvision.models.resnet50()
    _randomize_batchnorm(eager)
    eager = eager.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    fused = fusedres.convert(copy.deepcopy(eager), backend=args.backend)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        expected = eager.double()(x.double()) if device.type == "cpu" else eager.float()(x.float())
        eager.to(dtype)
        got = fused(x).double()
        baseline = eager(x).double()
    scale = expected.abs().max().item()
    err_fused = (got - expected).abs().max().item() / scale
    err_eager = (baseline - expected).abs().max().item() / scale
    budget = max(1e-4 if dtype == torch.float32 else 2e-2, 4 * err_eager)
    ok = err_fused <= budget
    print(f"logits vs high-precision reference: fusedres {err_fused:.2e}, eager {err_eager:.2e} "
          f"(relative max error; budget {budget:.1e}) -> {'OK' if ok else 'MISMATCH'}")

    print(f"timing {args.iters} iterations each (median)...")
    fused_name = f"fusedres ({args.backend or backends.get_default_backend()})"
    rates = _images_per_second({"eager PyTorch": eager, fused_name: fused}, x, args.iters)
    print(f"\n{'model':<24}{'images/s':>12}{'vs eager':>10}")
    for name, ips in rates.items():
        print(f"{name:<24}{ips:>12.1f}{ips / rates['eager PyTorch']:>9.2f}x")
    return 0 if ok else 1


def _cifar_models_and_data(args: argparse.Namespace) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The models of ``--models`` (eval, on the device) with ``--weights``, and ``--samples`` test
    images with labels: CIFAR-10 from ``--data``, else the synthetic task of examples/train_cifar.py."""
    from fusedres import models
    from fusedres.models.cifar_data import load_cifar10, synthetic_cifar10

    if args.weights and len(args.weights) != len(args.models):
        raise SystemExit(f"--weights needs one path per model ({len(args.models)}), got {len(args.weights)}")
    device = _device(args.device)
    torch.manual_seed(args.seed)
    built = {}
    for i, name in enumerate(args.models):
        if name not in models.CIFAR_MODELS:
            raise SystemExit(f"unknown CIFAR model {name!r}; choose from {', '.join(models.CIFAR_MODELS)}")
        model = models.CIFAR_MODELS[name]()
        if args.weights:
            model.load_state_dict(torch.load(args.weights[i], map_location="cpu", weights_only=True))
        built[name] = model.eval().to(device)
    if args.data:
        images, labels = load_cifar10(args.data, "test")
        images, labels = images[: args.samples], labels[: args.samples]
    else:
        images, labels = synthetic_cifar10(args.samples, "test")
    origin = f"CIFAR-10 test images from {args.data}" if args.data else "synthetic test images"
    weights = "weights from --weights" if args.weights else "random weights"
    print(f"{', '.join(built)} ({weights}) on {device}; {len(images)} {origin}")
    return built, images.to(device), labels.to(device)


def _save_plot(plot: Callable[[Any, str], None], data: Any, path: str) -> None:
    try:
        plot(data, path)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    print(f"wrote {path}")


def cmd_responses(args: argparse.Namespace) -> int:
    from fusedres import analysis

    built, images, _ = _cifar_models_and_data(args)
    responses = {name: analysis.layer_responses(model, images) for name, model in built.items()}
    names = max((list(r) for r in responses.values()), key=len)
    columns = [list(r.values()) for r in responses.values()]
    print(f"\nstd of each 3x3 layer's response (after BN, before ReLU/addition)\n{'layer':>5}  {'name':<18}"
          + "".join(f"{m:>12}" for m in responses))
    for i, layer in enumerate(names):
        cells = (f"{c[i]:>12.4f}" if i < len(c) else " " * 12 for c in columns)
        print(f"{i + 1:>5}  {layer:<18}" + "".join(cells))
    _save_plot(analysis.plot_responses, responses, args.plot)
    return 0


def cmd_lesion(args: argparse.Namespace) -> int:
    from fusedres import analysis

    built, images, labels = _cifar_models_and_data(args)
    data = list(zip(images.split(args.batch_size), labels.split(args.batch_size)))
    if args.metric == "logit-change":
        data = [(x, None) for x, _ in data]
    sweeps = {}
    for name, model in built.items():
        blocks = len(analysis.residual_blocks(model))
        if not 1 <= args.k_max <= blocks:
            raise SystemExit(f"--k-max must be in 1..{blocks}, the residual blocks of {name}")
        sweeps[name] = analysis.lesion_sweep(model, data, args.k_max, args.draws, args.seed)
    metric = next(iter(sweeps.values()))[0].metric
    print(f"\n{metric} with k random residual blocks deleted ({args.draws} draws each): mean [min, max]")
    print(f"{'k':>3}" + "".join(f"{name:>26}" for name in sweeps))
    for k in range(args.k_max + 1):
        cells = (f"{r.mean:.4f} [{r.min:.4f}, {r.max:.4f}]" for r in (s[k] for s in sweeps.values()))
        print(f"{k:>3}" + "".join(f"{c:>26}" for c in cells))
    _save_plot(analysis.plot_lesion_sweep, sweeps, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedres", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="convert a ResNet-50, verify it, time it (default)")
    info = sub.add_parser("info", help="what was built and which backends can run here")
    info.set_defaults(run=cmd_info)
    responses = sub.add_parser("responses", help="std of each 3x3 layer's response (He et al. 2015, Fig. 7)")
    responses.set_defaults(run=cmd_responses)
    lesion = sub.add_parser("lesion", help="error after deleting random residual blocks (Veit et al. 2016)")
    lesion.set_defaults(run=cmd_lesion)
    lesion.add_argument("--k-max", type=int, default=10, help="delete 1..K blocks (default 10)")
    lesion.add_argument("--draws", type=int, default=5, help="random sets of blocks per k (default 5)")
    lesion.add_argument("--metric", choices=("error", "logit-change"), default="error",
                        help="top-1 error, or the relative change of the logits (needs no trained model)")
    lesion.add_argument("--batch-size", type=int, default=500)
    for p, default_models, default_plot in ((responses, ["resnet56", "plain56"], "responses.png"),
                                            (lesion, ["resnet56"], "lesion.png")):
        p.add_argument("--models", nargs="+", default=default_models, metavar="NAME",
                       help=f"CIFAR models (default: {' '.join(default_models)})")
        p.add_argument("--weights", nargs="+", metavar="PATH", help="a state_dict per model (default: random init)")
        p.add_argument("--data", metavar="PATH", help="cifar-10-batches-py directory (default: synthetic images)")
        p.add_argument("--samples", type=int, default=256, help="test images used (default 256)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument("--seed", type=int, default=0, help="seeds the random weights and the lesion draws")
        p.add_argument("--plot", default=default_plot, metavar="PNG",
                       help=f"plot file (default {default_plot}; needs matplotlib)")
    for p in (parser, check):
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--size", type=int, default=224, help="image height and width")
        p.add_argument("--iters", type=int, default=5)
        p.add_argument("--backend", choices=backends.BACKENDS, default=None)
        p.set_defaults(run=cmd_check)
    args = parser.parse_args(argv)
    return args.run(args)
