"""Command line: ``python -m fusedres [check|info]``.

``check`` (the default) converts a torchvision ResNet-50, checks its eval logits against the
unfused model on this machine's device and prints eager vs fusedres throughput. ``info`` says
what was built and which backends can run here, and why the others cannot.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedres", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="convert a ResNet-50, verify it, time it (default)")
    info = sub.add_parser("info", help="what was built and which backends can run here")
    info.set_defaults(run=cmd_info)
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
