"""Command line: python -m fusedres [check|info|responses|lesion].

check (the default) converts a torchvision ResNet-50, checks its eval logits against the unfused
model on this machine's device and prints eager vs fusedres throughput. info says what was
built, which kernels each backend runs here, and why the others cannot (it exits 1 when the
extension is not loaded, unless --allow-missing). responses and lesion run the analyses of
fusedres.analysis on CIFAR-10 models.
"""

from __future__ import annotations

import argparse
import collections
import copy
import pathlib
import pickle
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


def extension_status() -> str:
    """One line: whether fusedres._C is loaded and which of its kernels were built (and why not)."""
    if not _extension.loaded():
        return f"fusedres._C: NOT LOADED: {_extension.LOAD_ERROR}"
    cuda = ("CUDA kernels" if _extension.with_cuda_kernels()
            else f"no CUDA kernels (not built: {_extension.cuda_build_note()})")
    return f"fusedres._C: loaded from {_extension.location()}; built: C++ CPU kernels, {cuda}"


def _reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """``backends.unusable_reason``, without repeating the extension's load error on every line."""
    if backend == "native" and not _extension.loaded():
        return "fusedres._C is not loaded (why: see fusedres._C above)"
    return backends.unusable_reason(backend, device, dtype)


def what_runs(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Which kernels ``backend`` (None: the default) runs on ``device``, and why a fallback happens."""
    name = backends.check_backend(backend or backends.get_default_backend())
    if name == "auto":
        candidates = backends.auto_candidates(device, dtype)
        listed = ", ".join(f"{c} ({backends.kernels_of(c, device)})" for c in candidates)
        skipped = [f"{c}: {_reason(c, device, dtype)}" for c in ("native", "triton")
                   if c not in candidates and (c == "native" or device.type == "cuda")]
        chooses = (f"auto times {listed} per op and shape and keeps the fastest" if len(candidates) > 1
                   else f"auto runs {listed}, the only usable backend")
        return chooses + (f"; not timed: {'; '.join(skipped)}" if skipped else "")
    order = backends._FALLBACK_ORDER
    chain = order[order.index(name):] if name in order else (name, *order)
    reasons = []
    for candidate in chain:
        reason = _reason(candidate, device, dtype)
        if reason is None:
            runs = f"{candidate} ({backends.kernels_of(candidate, device)})"
            return runs if not reasons else f"{runs}, falling back from {name}: {'; '.join(reasons)}"
        reasons.append(f"{candidate}: {reason}")
    raise AssertionError("the reference backend is always usable")


def eval_convs(backend: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """The kernels a converted block's eval convs run on instead of the backend's own, or None
    (on the CPU, ``auto`` means oneDNN's convolution with the BN folded, and Winograd for 3x3
    stride-1 fp32 convs where it times faster; see fusedres/nn/plan.py)."""
    try:
        from fusedres.nn import plan
        from fusedres.ops import winograd
    except ImportError:
        return None
    name = backends.check_backend(backend or backends.get_default_backend())
    if plan.onednn_reason(device, dtype, name) is not None:
        return None
    kernels = backends.kernels_of(plan.ONEDNN, device)
    if kernels == plan.ONEDNN:
        kernels = "oneDNN convolutions, BN folded in, ReLU and residual add as post-ops"
    described = f"{plan.ONEDNN} ({kernels})"
    reason = winograd.unusable_reason((3, 3), (1, 1), (1, 1), (1, 1), 1, dtype, device)
    if reason is None and plan.WINOGRAD != "off":
        when = "always" if plan.WINOGRAD == "on" else "where it times faster"
        described += (f"; 3x3 stride-1 convs on {plan.WINOGRAD_KERNEL} "
                      f"({backends.kernels_of(plan.WINOGRAD_KERNEL, device)}) {when}")
    return described


def cmd_info(args: argparse.Namespace) -> int:
    import fusedres

    print(f"fusedres {fusedres.__version__} ({_extension.PACKAGE_DIR})  python {platform.python_version()}  "
          f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton {triton.__version__}" + ("  (TRITON_INTERPRET=1: kernels run in the interpreter)"
                                               if backends.triton_interpreted() else ""))
    except ImportError:
        print("triton: not installed")
    print(extension_status())
    from fusedres.ops import cudnn

    print(cudnn.status_lines())
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print("GPU: none visible (torch.cuda.is_available() is False)"
              + (": the CUDA kernels are built but cannot run here" if _extension.with_cuda_kernels() else ""))
    print(f"default backend: {backends.get_default_backend()}")
    for dev in devices:
        print(f"backends on {dev.type} (fp32):")
        for name in ("native", "cudnn", "triton", "reference"):
            reason = _reason(name, dev, torch.float32)
            print(f"  {name:<10} " + (f"usable: {backends.kernels_of(name, dev)}" if reason is None
                                      else f"unusable: {reason}"))
        onednn = eval_convs("auto", dev, torch.float32)
        print(f"  {'auto':<10} {what_runs('auto', dev, torch.float32).removeprefix('auto ')}"
              + (f"; a converted block's eval convs run on {onednn}" if onednn else ""))
        if onednn and dev.type == "cpu":
            from fusedres.ops import onednn as onednn_ops

            bf16 = onednn_ops.unusable_reason(dev, torch.bfloat16)
            print(f"  {'':<10} bf16 eval convs on oneDNN: " + ("yes" if bf16 is None else f"no ({bf16})"))
    if _extension.loaded():
        return 0
    print(f"\nfusedres._C is not loaded: {_extension.LOAD_ERROR}.\nTo fix: {_extension.REMEDY}.")
    if args.allow_missing:
        return 0
    print("(exit status 1; --allow-missing exits 0)")
    return 1


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


def _auto_choices(device: torch.device, dtype: torch.dtype) -> str:
    """What auto chose for the ops it timed on ``device`` and ``dtype`` (e.g. 'native for 20 of 20')."""
    chosen = collections.Counter(choice for key, choice in backends._auto_choice.items()
                                 if key[-2:] == (device.type, dtype))
    total = sum(chosen.values())
    return ", ".join(f"{name} ({backends.kernels_of(name, device)}) for {n} of {total}"
                     for name, n in chosen.most_common())


def cmd_check(args: argparse.Namespace) -> int:
    try:
        import torchvision
    except ImportError:
        print("the check needs torchvision: pip install torchvision", file=sys.stderr)
        return 2
    import fusedres

    device = _device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backend = args.backend or backends.get_default_backend()
    print(extension_status())
    onednn = eval_convs(backend, device, dtype)
    print(f"fusedres ({backend}) on {device}, {args.dtype}: "
          + (f"eval convs run on {onednn}" if onednn else what_runs(backend, device, dtype)))
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
    if backend == "auto" and _auto_choices(device, dtype):
        print(f"auto chose: {_auto_choices(device, dtype)}")

    print(f"timing {args.iters} iterations each (median)...")
    fused_name = f"fusedres ({backend})"
    rates = _images_per_second({"eager PyTorch": eager, fused_name: fused}, x, args.iters)
    print(f"\n{'model':<24}{'images/s':>12}{'vs eager':>10}")
    for name, ips in rates.items():
        print(f"{name:<24}{ips:>12.1f}{ips / rates['eager PyTorch']:>9.2f}x")
    if not _extension.loaded():
        print(f"\nNOTE: fusedres._C is not loaded, so fusedres ran without its compiled kernels: this is not "
              f"the fused speed.\n{_extension.LOAD_ERROR}.\nTo fix: {_extension.REMEDY}.")
    return 0 if ok else 1


def _fail(message: str) -> SystemExit:
    """A one-line error for the user (no traceback)."""
    return SystemExit(f"python -m fusedres: error: {message}")


def _trained_weights_hint(names: list[str]) -> str:
    """Where examples/train_cifar.py left trained weights for these models, as a --weights argument."""
    found = [pathlib.Path("runs") / name / "weights.pt" for name in names]
    if all(p.is_file() for p in found):
        return f"trained weights from examples/train_cifar.py are here: --weights {' '.join(map(str, found))}"
    return "examples/train_cifar.py --model NAME trains one and writes runs/NAME/weights.pt"


def _cifar_models_and_data(args: argparse.Namespace) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The models of ``--models`` (eval, on the device) with ``--weights``, and ``--samples`` test
    images with labels: CIFAR-10 from ``--data``, else the synthetic task of examples/train_cifar.py."""
    from fusedres import models
    from fusedres.models.cifar_data import load_cifar10, synthetic_cifar10

    if args.weights and len(args.weights) != len(args.models):
        raise _fail(f"--weights needs one path per model ({len(args.models)}), got {len(args.weights)}")
    device = _device(args.device)
    torch.manual_seed(args.seed)
    built = {}
    for i, name in enumerate(args.models):
        model = models.CIFAR_MODELS[name]()
        if args.weights:
            path = pathlib.Path(args.weights[i])
            if not path.is_file():
                raise _fail(f"--weights: {path} does not exist ({_trained_weights_hint([name])})")
            try:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except (EOFError, pickle.UnpicklingError):
                raise _fail(f"--weights: {path} is not a state_dict saved by torch.save") from None
            except (RuntimeError, KeyError, ValueError, OSError) as exc:
                raise _fail(f"--weights: {path} is not a {name} state_dict ({' '.join(str(exc).split())[:160]})") from None
        built[name] = model.eval().to(device)
    if args.data:
        try:
            images, labels = load_cifar10(args.data, "test")
        except FileNotFoundError as exc:
            raise _fail(f"--data: {args.data} is not a cifar-10-batches-py directory (missing {exc.filename}); "
                        "get it from https://www.cs.toronto.edu/~kriz/cifar.html (python version)") from None
        images, labels = images[: args.samples], labels[: args.samples]
    else:
        images, labels = synthetic_cifar10(args.samples, "test")
    origin = f"CIFAR-10 test images from {args.data}" if args.data else "synthetic test images"
    weights = "weights from --weights" if args.weights else "random weights"
    print(f"{', '.join(built)} ({weights}) on {device}; {len(images)} {origin}")
    if not args.weights:
        print(f"note: the weights are untrained (random init), so the figures are not those of the papers, "
              f"which are of trained networks; {_trained_weights_hint(list(built))}")
    return built, images.to(device), labels.to(device)


def _save_plot(plot: Callable[..., None], data: Any, path: str, **kwargs: Any) -> None:
    try:
        plot(data, path, **kwargs)
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
    _save_plot(analysis.plot_responses, responses, args.plot,
               weights="trained weights" if args.weights else "random (untrained) weights")
    return 0


LESION_K_MAX = 10  # the default --k-max, capped by each model's residual blocks


def cmd_lesion(args: argparse.Namespace) -> int:
    from fusedres import analysis

    built, images, labels = _cifar_models_and_data(args)
    metric = args.metric or ("error" if args.weights else "logit-change")
    if metric == "error" and not args.weights:
        print("note: --metric error on untrained weights measures chance-level guessing (about 90% error)")
    elif metric == "logit-change" and not args.metric:
        print("metric: relative change of the logits, |logits - intact| / |intact| (untrained weights: top-1 "
              "error would be chance-level noise; with --weights the default is the error)")
    data = list(zip(images.split(args.batch_size), labels.split(args.batch_size)))
    if metric == "logit-change":
        data = [(x, None) for x, _ in data]
    sweeps = {}
    for name, model in built.items():
        blocks = len(analysis.residual_blocks(model))
        k_max = args.k_max or min(LESION_K_MAX, blocks)
        if not 1 <= k_max <= blocks:
            raise _fail(f"--k-max must be in 1..{blocks}, the residual blocks of {name}; got {k_max}")
        sweeps[name] = analysis.lesion_sweep(model, data, k_max, args.draws, args.seed)
    k_top = max(len(s) for s in sweeps.values())
    label = next(iter(sweeps.values()))[0].metric
    print(f"\n{label} with k random residual blocks deleted ({args.draws} distinct draws each): mean [min, max]")
    print(f"{'k':>3}" + "".join(f"{name:>26}" for name in sweeps))
    for k in range(k_top):
        cells = (f"{s[k].mean:.4f} [{s[k].min:.4f}, {s[k].max:.4f}]" if k < len(s) else "" for s in sweeps.values())
        print(f"{k:>3}" + "".join(f"{c:>26}" for c in cells))
    _save_plot(analysis.plot_lesion_sweep, sweeps, args.plot,
               weights="trained weights" if args.weights else "random (untrained) weights")
    return 0


def cmd_cudnn_support(args: argparse.Namespace) -> int:
    """The cudnn backend's support table: every graph x dtype x stored arch, planned here."""
    from fusedres.ops import cudnn

    if not cudnn.loaded():
        print(f"the cuDNN backend is not available: {cudnn.LOAD_ERROR}")
        return 1
    files = sorted(pathlib.Path(args.properties).glob("*.json"))
    if not files:
        print(f"no device-property files (*.json) in {args.properties}")
        return 1
    props = [cudnn.DeviceProperties.from_file(f) for f in files if f.stem in args.archs or not args.archs]
    print(f"{cudnn.runtime_info()}; planned without a GPU against {', '.join(f'{p.name} (sm{p.sm_version})' for p in props)}\n")
    print(cudnn.format_support_table(cudnn.support_table(props)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fusedres import models

    residual = [n for n in models.CIFAR_MODELS if not n.startswith("plain")]
    parser = argparse.ArgumentParser(prog="python -m fusedres", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check", help="convert a ResNet-50, verify it, time it (default)")
    info = sub.add_parser("info", help="what was built, which kernels run here, and why the others cannot")
    info.add_argument("--allow-missing", action="store_true",
                      help="exit 0 even when fusedres._C is not loaded (default: exit 1)")
    info.set_defaults(run=cmd_info)
    responses = sub.add_parser("responses", help="std of each 3x3 layer's response (He et al. 2015, Fig. 7)")
    responses.set_defaults(run=cmd_responses)
    lesion = sub.add_parser("lesion", help="deleting random residual blocks (Veit et al. 2016)")
    lesion.set_defaults(run=cmd_lesion)
    cudnn_support = sub.add_parser("cudnn-support", help="which cuDNN graphs plan on sm80/sm90, planned here without a GPU")
    cudnn_support.add_argument("--properties", default=str(_extension.PACKAGE_DIR.parent / "tests" / "data" / "cudnn-device-properties"),
                               metavar="DIR", help="cudnn-frontend DeviceProperties JSON files (default: the tests' a100/h200)")
    cudnn_support.add_argument("--archs", nargs="*", default=["a100", "h200"], metavar="NAME",
                               help="property files to use, by stem (default: a100 h200; none: all in DIR)")
    cudnn_support.set_defaults(run=cmd_cudnn_support)
    lesion.add_argument("--k-max", type=int, default=None,
                        help=f"delete 1..K blocks (default: {LESION_K_MAX} or the model's residual blocks if fewer)")
    lesion.add_argument("--draws", type=int, default=5,
                        help="distinct random sets of blocks per k (default 5; fewer where fewer sets exist)")
    lesion.add_argument("--metric", choices=("error", "logit-change"), default=None,
                        help="top-1 error, or the relative change of the logits, which needs no trained model "
                             "(default: error with --weights, else logit-change)")
    lesion.add_argument("--batch-size", type=int, default=500)
    for p, choices, default_models, default_plot in (
            (responses, list(models.CIFAR_MODELS), ["resnet56", "plain56"], "responses.png"),
            (lesion, residual, ["resnet56"], "lesion.png")):
        p.add_argument("--models", nargs="+", default=default_models, metavar="NAME", choices=choices,
                       help=f"CIFAR models: {', '.join(choices)} (default: {' '.join(default_models)})")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
