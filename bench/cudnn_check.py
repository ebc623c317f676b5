"""The ``cudnn`` backend on a real GPU (a step of bench/gpu_check.sh).

1. Serializes this GPU's cudnn-frontend ``DeviceProperties`` to ``<out>/<stem>-device-properties.json``
   (the real file that replaces the hand-written ones in tests/data/cudnn-device-properties/).
2. Plans every graph of the support table on this GPU (fp16, bf16, fp32) and prints the table
   beside the one planned offline from the real properties file.
3. Converts a torchvision ResNet-50 to the ``cudnn`` backend and captures one CUDA graph of its
   eval forward and one of a train step (forward, backward, SGD step); each replay must equal the
   eager call it was captured from.

``--dry-run`` runs the same code on the CPU without a GPU: the stored sm90 properties instead of
the device's, a tiny ResNet-50 input, the native backend and no capture.

    python -m bench.cudnn_check --out bench/results --stem NAME [--dry-run]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import fusedres
from fusedres.ops import cudnn


def device_properties(out: Path, stem: str, dry_run: bool) -> cudnn.DeviceProperties:
    if dry_run:
        props = cudnn.DeviceProperties.from_file(cudnn.stored_properties_dir() / "h200.json")
        print(f"dry run: the stored {props.name} properties stand in for the device's")
        return props
    import cudnn as frontend  # nvidia-cudnn-frontend's Python bindings

    text = frontend.create_device_properties(torch.cuda.current_device()).serialize()
    path = out / f"{stem}-device-properties.json"
    path.write_text(text)
    fields = json.loads(text)
    print(f"device properties of {fields['deviceName']} written to {path}")
    return cudnn.DeviceProperties(fields["deviceName"], text, fields["deviceVer"] // 10, fields["multiProcessorCount"])


def support_tables(props: cudnn.DeviceProperties, dry_run: bool) -> None:
    print("\nplanned offline from the properties file:")
    print(cudnn.format_support_table(cudnn.support_table([props])))
    if dry_run:
        return
    rows = []
    for label, graph in cudnn.SUPPORT_GRAPHS.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            r = cudnn.plan(graph, dtype, device=torch.cuda.current_device())
            rows.append({"graph": label, "dtype": cudnn.DTYPES[dtype], "arch": "this GPU", "status": r["status"],
                         "num_plans": r["num_plans"], "workspace": r["workspace"], "reason": cudnn._reason(r)})
            if r["status"] != "planned":
                print(f"  {label} {cudnn.DTYPES[dtype]}: {r['status']} at {r['stage']}: {cudnn._reason(r)}")
    print("\nplanned on this GPU (with its handle; run-time compiled engines included):")
    print(cudnn.format_support_table(rows))


def _capture(fn, warmup: int = 2):
    """(the graph, its static output): ``fn`` warmed up on a side stream, then captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# Replay and eager run the same plans; only engines with split-K atomics may differ in rounding.
REPLAY_TOLERANCE = 1e-3


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def resnet50_graphs(dry_run: bool) -> list[str]:
    """Captures and replays ResNet-50 eval and one train step on the cudnn backend; returns failures."""
    import torchvision

    device = torch.device("cpu" if dry_run else "cuda")
    backend = "native" if dry_run else "cudnn"
    dtype = torch.float32 if dry_run else torch.float16
    batch, size = (2, 64) if dry_run else (32, 224)
    failures = []
    torch.manual_seed(0)
    model = fusedres.convert(torchvision.models.resnet50(), backend=backend)
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    model.eval()
    with torch.inference_mode():
        if dry_run:
            out = model(x)
            print(f"dry run: eval forward ran on the CPU ({tuple(out.shape)}), no capture")
        else:
            t0 = time.perf_counter()
            graph, static_out = _capture(lambda: model(x))
            eager = model(x)
            graph.replay()
            torch.cuda.synchronize()
            err = _relative(static_out, eager)
            print(f"eval: captured and replayed in {time.perf_counter() - t0:.1f} s; "
                  f"replay vs eager: max relative difference {err:.3g}")
            if err > REPLAY_TOLERANCE:
                failures.append(f"eval replay differs from eager by {err:.3g}")

    model.train()
    target = torch.randint(0, 1000, (batch,), device=device)
    # No momentum: the step has no optimizer state, so restoring the model restores everything the
    # captured step reads.
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
        return loss

    if dry_run:
        print(f"dry run: one train step on the CPU, loss {step().item():.4f}, no capture")
        return failures
    # Replaying the captured step must reproduce the step an eager call of the same state makes.
    state = copy.deepcopy(model.state_dict())
    graph, static_loss = _capture(step)
    model.load_state_dict(state)
    graph.replay()
    replay_loss = static_loss.detach().clone()
    after_replay = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(state)
    eager_loss = step().detach()
    worst = max(_relative(a, p) for a, p in zip(after_replay, model.parameters()))
    loss_err = _relative(replay_loss, eager_loss)
    print(f"train step: replayed loss {replay_loss.item():.5f}, eager {eager_loss.item():.5f}; "
          f"max relative parameter difference {worst:.3g}")
    if loss_err > REPLAY_TOLERANCE or worst > REPLAY_TOLERANCE:
        failures.append(f"train replay differs from eager (loss {loss_err:.3g}, parameters {worst:.3g})")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--stem", default="cudnn-check", help="file name stem of the properties file")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, without a GPU (see the module doc)")
    parser.add_argument("--skip-models", action="store_true", help="properties and support tables only")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("cudnn_check: no CUDA GPU visible (use --dry-run to exercise it on the CPU)", file=sys.stderr)
        return 2
    print(cudnn.status_lines())
    if not cudnn.loaded():
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    props = device_properties(args.out, args.stem, args.dry_run)
    support_tables(props, args.dry_run)
    failures = [] if args.skip_models else resnet50_graphs(args.dry_run)
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
