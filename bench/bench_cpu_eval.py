"""The CPU eval path: whole ResNets and single convs, fp32, on oneDNN (and Winograd) through a
converted model's launch plans, side by side with eager, BN-folded eager and ``torch.compile``
with freezing.

Models: ResNet-50 and ResNet-18, batch 1 and 8, 1 and 2 threads, channels_last and NCHW input,
forward under no_grad. Competitors, timed round-robin in one run (bench/_harness.py):

- ``eager``: the torchvision model;
- ``eager-bn-folded``: BN folded into the convs by ``torch.fx.experimental.optimization.fuse``;
- ``compile-freezing``: ``torch.compile`` with ``torch._inductor.config.freezing = True`` (its
  compile time is reported apart, as ``compile_s``, and is not in the timed calls);
- ``fusedres-auto``: ``fusedres.convert(model)``; on the CPU its blocks' eval convs and its stem
  (conv1 + bn1 + relu) are one call each (fusedres/nn/plan.py): oneDNN, or Winograd F(2x2, 3x3)
  for the 3x3 stride-1 convs where it timed faster when the plan was made (the count of each is
  recorded as ``kernels``). Pooling and the classifier stay eager.

Per-op rows (``test_onednn_conv``): each distinct conv of ResNet-50 with its BN and epilogue as
eager conv2d + batch_norm + relu (+ add), as ``torch.compile`` with freezing, as the oneDNN
packed conv and (3x3 stride-1 convs) the Winograd conv the plan may run, and as the C++ CPU
kernel (``conv_bn_act``, backend ``native``).

``--quick``: ResNet-18 at 56x56, batch 1, 1 thread, and the convs of one block plus a 3x3
stride-1 conv.
"""

from __future__ import annotations

import collections
import copy
import time
from dataclasses import dataclass

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

import fusedres
from bench import _harness, _resnet
from bench.bench_ops import ConvBnAct, conv_shapes
from fusedres.nn import plan as plan_mod
from fusedres.ops import _ref, onednn, winograd

CL = torch.channels_last
NUM_CLASSES = 1000
MODEL_COMPETITORS = ("eager", "eager-bn-folded", "compile-freezing", "fusedres-auto")
OP_COMPETITORS = ("eager", "compile-freezing", "fusedres-onednn", "fusedres-winograd", "fusedres-native")


def _model_params(settings: _harness.Settings) -> dict:
    if settings.quick:
        return {"arch": ["resnet18"], "batch": [1], "threads": [1], "layout": ["channels_last"]}
    return {"arch": ["resnet50", "resnet18"], "batch": [8, 1], "threads": [1, 2], "layout": ["channels_last", "nchw"]}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = _harness.settings(metafunc.config)
    if metafunc.function.__name__ == "test_cpu_eval_model":
        for name, values in _model_params(settings).items():
            metafunc.parametrize(name, values)
        metafunc.parametrize("competitor", MODEL_COMPETITORS)
    elif metafunc.function.__name__ == "test_onednn_conv":
        shapes = _op_shapes(settings)
        metafunc.parametrize("case_name", list(shapes))
        metafunc.parametrize("threads", [1] if settings.quick else [1, 2])
        metafunc.parametrize("competitor", OP_COMPETITORS)


def _op_shapes(settings: _harness.Settings) -> dict[str, _resnet.ConvShape]:
    shapes = conv_shapes(settings)
    if settings.quick:  # and a 3x3 stride-1 conv, which Winograd takes
        shapes["layer2.1.conv2"] = {s.name: s for s in _resnet.conv_shapes("resnet50", settings.image_size)}[
            "layer2.1.conv2"]
    return shapes


def _skip_unless_cpu(settings: _harness.Settings) -> None:
    if settings.device.type != "cpu":
        pytest.skip("the CPU eval path is benchmarked on the CPU")
    reason = onednn.unusable_reason(settings.device, torch.float32)
    if reason:
        pytest.skip(reason)


def _compiled(module: nn.Module, example: tuple) -> tuple[nn.Module, float]:
    """``torch.compile`` with freezing, compiled now on ``example``; returns it and the seconds the
    first call took (the compile)."""
    compiled = torch.compile(module, fullgraph=True)
    start = time.perf_counter()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled(*example)
    return compiled, time.perf_counter() - start


def _record_compile_time(case: _harness.Case, competitor: str, seconds: float) -> None:
    entry = case.entries[competitor]
    entry.info["compile_s"] = seconds
    entry.benchmark.extra_info["compile_s"] = seconds


# --- whole models ----------------------------------------------------------------------------


@dataclass
class ModelCase:
    case: _harness.Case
    model: nn.Module


def _build_model_case(arch: str, batch: int, layout: str, threads: int, settings: _harness.Settings) -> ModelCase:
    size = settings.image_size
    model = _resnet.build_model(arch).eval()
    meta = _resnet.meta_forward(model, (batch, 3, size, size))
    memory_format = CL if layout == "channels_last" else torch.contiguous_format

    def make_inputs() -> tuple:
        return (torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format),)

    inputs = _harness.Rotation(make_inputs, settings.device)
    model = model.to(memory_format=memory_format)
    with torch.no_grad():
        reference = (copy.deepcopy(model).double()(inputs.first[0].double()),)
        eager = (model(inputs.first[0]),)
    work = _harness.Work(meta.flops, _harness.tensor_bytes(inputs.first) + _harness.state_bytes(model)
                         + batch * NUM_CLASSES * 4, images=batch)
    label = f"{arch} {batch}x3x{size}x{size} {layout} {threads} thread{'s' if threads > 1 else ''}"
    case = _harness.Case(
        suite="cpu-eval", mode="inference", label=label, dtype=torch.float32, batch=batch, inference=True,
        inputs=inputs, expected=_harness.Expected(reference, _harness.max_error(eager, reference)), work=work,
    )
    return ModelCase(case, model)


_model_case = _harness.cached_case(_build_model_case)


def test_cpu_eval_model(benchmark, request, bench_settings, arch, batch, threads, layout, competitor):
    _skip_unless_cpu(bench_settings)
    torch.set_num_threads(threads)  # held until the case is timed after its last competitor
    prepared = _model_case(arch, batch, layout, threads, bench_settings)
    case = prepared.case
    model = copy.deepcopy(prepared.model)
    compile_s = None
    if competitor == "eager-bn-folded":
        from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    elif competitor == "compile-freezing":
        model, compile_s = _compiled(model, case.inputs.first)
    elif competitor == "fusedres-auto":
        model = fusedres.convert(model, backend="auto")
    _harness.run(benchmark, request.config, case, competitor, model)
    if competitor == "fusedres-auto":
        kernels = collections.Counter(k for m in model.modules() if getattr(m, "_eval_plan", None)
                                      for k in m._eval_plan.kernels)
        assert set(kernels) <= {plan_mod.ONEDNN, plan_mod.WINOGRAD_KERNEL}, f"the converted blocks ran {kernels}"
        assert isinstance(model._stem_plan, plan_mod.StemPlan), "the stem did not run as one oneDNN call"
        case.entries[competitor].info["kernels"] = dict(kernels)
        benchmark.extra_info["kernels"] = dict(kernels)
    if compile_s is not None:
        _record_compile_time(case, competitor, compile_s)
    case.entries[competitor].info["threads"] = threads
    benchmark.extra_info["threads"] = threads


# --- single convs ----------------------------------------------------------------------------


@dataclass
class OpCase:
    case: _harness.Case
    module: ConvBnAct
    shape: _resnet.ConvShape


def _build_op_case(case_name: str, threads: int, settings: _harness.Settings) -> OpCase:
    shape = _op_shapes(settings)[case_name]
    batch = settings.batch
    module = ConvBnAct(shape)
    _resnet.randomize_batchnorm(module, torch.Generator().manual_seed(0))
    module = module.eval().to(memory_format=CL)
    p, q = shape.out_hw

    def make_inputs() -> tuple:
        x = torch.randn(batch, shape.in_channels, shape.height, shape.width).contiguous(memory_format=CL)
        residual = torch.randn(batch, shape.out_channels, p, q).contiguous(memory_format=CL) if shape.residual else None
        return x, residual

    inputs = _harness.Rotation(make_inputs, settings.device)
    x, residual = inputs.first
    with torch.no_grad():
        reference = (copy.deepcopy(module).double()(x.double(), None if residual is None else residual.double()),)
        eager = (module(x, residual),)
    # fp32 bytes: read x, W and the residual, write the output.
    moved = x.numel() + module.conv.weight.numel() + batch * shape.out_channels * p * q
    work = _harness.Work(shape.flops(batch), 4 * (moved + (0 if residual is None else residual.numel())))
    case = _harness.Case(
        suite="cpu-eval-ops", mode="eval", label=f"{shape.label} {threads}T", dtype=torch.float32, batch=batch,
        inference=True, inputs=inputs, expected=_harness.Expected(reference, _harness.max_error(eager, reference)),
        work=work,
    )
    return OpCase(case, module, shape)


_op_case = _harness.cached_case(_build_op_case)


def test_onednn_conv(benchmark, request, bench_settings, case_name, threads, competitor):
    _skip_unless_cpu(bench_settings)
    torch.set_num_threads(threads)
    prepared = _op_case(case_name, threads, bench_settings)
    case, module, shape = prepared.case, prepared.module, prepared.shape
    conv, bn = module.conv, module.bn
    compile_s = None
    if competitor == "eager":
        call = module
    elif competitor == "compile-freezing":
        call, compile_s = _compiled(copy.deepcopy(module), case.inputs.first)
    elif competitor in ("fusedres-onednn", "fusedres-winograd"):
        geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
        packing = onednn.PackedConv
        if competitor == "fusedres-winograd":
            reason = winograd.unusable_reason(conv.kernel_size, *geometry, torch.float32, bench_settings.device)
            if reason:
                pytest.skip(reason)
            packing = winograd.PackedWinograd
        weight, shift = fusedres.ops.bn_fold.fold(conv, bn)
        packed = packing(weight, shift, *geometry, case.inputs.first[0].shape, torch.float32)

        def call(x, residual=None):
            if residual is None:
                return packed(x, shape.relu)
            return packed.add_relu(x, residual, inplace=False)  # the caller's residual: out of place
    else:
        if _harness.skip_reason(competitor, bench_settings.device, torch.float32):
            pytest.skip(_harness.skip_reason(competitor, bench_settings.device, torch.float32))
        weight, shift = (t.detach() for t in fusedres.ops.bn_fold.fold(conv, bn))

        def call(x, residual=None):
            return fusedres.conv_bn_act(x, weight, None, shift, residual, conv.stride, conv.padding, conv.dilation,
                                        conv.groups, relu=shape.relu, backend="native")
    _harness.run(benchmark, request.config, case, competitor, call)
    if compile_s is not None:
        _record_compile_time(case, competitor, compile_s)
    case.entries[competitor].info["threads"] = threads
    benchmark.extra_info["threads"] = threads


def test_reference_matches_eager_fold():
    """The folded (scale, shift) the per-op rows use is the reference's own fold."""
    module = ConvBnAct(_resnet.conv_shapes("resnet18", 56)[0]).eval()
    _resnet.randomize_batchnorm(module, torch.Generator().manual_seed(0))
    scale, shift = _ref.fold_bn(module.bn.running_mean, module.bn.running_var, module.bn.weight, module.bn.bias,
                                module.bn.eps)
    weight, folded_shift = fusedres.ops.bn_fold.fold(module.conv, module.bn)
    torch.testing.assert_close(weight, module.conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded_shift, shift)


# --- host time per conv ----------------------------------------------------------------------


def host_time_per_conv(rounds: int = 41, calls: int = 200) -> list[dict]:
    """A converted block's host time above its kernels, per conv: tiny shapes (batch 1, 8
    channels, 4x4), where a conv's arithmetic is negligible, on one thread. Three calls are timed
    round-robin, in thread CPU time (another process's load does not count): the converted block
    (steady state, plan made), the same ops called directly with the plan's packed launches
    (the kernels: oneDNN, or Winograd where the plan chose it), and the eager torchvision block. Medians of ``rounds`` rounds."""
    import statistics

    from torchvision.models import resnet

    torch.set_num_threads(1)
    rows = []
    for name, block in [
        ("Bottleneck identity", resnet.Bottleneck(8, 2)),
        ("Bottleneck projection", resnet.Bottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                                                         nn.BatchNorm2d(16)))),
        ("BasicBlock identity", resnet.BasicBlock(8, 8)),
    ]:
        block.eval()
        fused = fusedres.convert(copy.deepcopy(block), backend="auto")
        x = torch.randn(1, 8, 4, 4).contiguous(memory_format=CL)
        with torch.no_grad():
            fused(x)
        plan = fused._eval_plan
        head = [step.packed.relu_launch for step in plan.steps[:-1]]
        last = plan.steps[-1].packed
        projection = plan.projection.packed.launch if plan.shortcut == "projection" else None

        def kernels():
            h = x
            for op, args in head:
                h = op(h, *args)
            if projection is not None:
                (op, args), (into, into_args) = projection, last.add_relu_into_launch
                return into(op(x, *args), h, *into_args)
            add, add_args = last.add_relu_launch
            return add(h, x, *add_args)

        calls_of = {"fused": lambda: fused(x), "kernels": kernels, "eager": lambda: block(x)}
        samples = {k: [] for k in calls_of}
        with torch.no_grad():
            for r in range(rounds):
                for key in list(calls_of)[r % 3:] + list(calls_of)[: r % 3]:
                    fn = calls_of[key]
                    start = time.thread_time()
                    for _ in range(calls):
                        fn()
                    samples[key].append((time.thread_time() - start) / calls * 1e6)
        assert fused._eval_plan is plan
        n = len(plan.kernels)
        med = {k: statistics.median(v) for k, v in samples.items()}
        q = {k: statistics.quantiles(v, n=4) for k, v in samples.items()}
        rows.append({"block": name, "convs": n, **{f"{k}_us": med[k] for k in med},
                     **{f"{k}_iqr_us": (q[k][0], q[k][2]) for k in q},
                     "host_above_kernels_per_conv_us": (med["fused"] - med["kernels"]) / n})
    return rows


if __name__ == "__main__":  # python bench/bench_cpu_eval.py: the host time per conv
    for row in host_time_per_conv():
        print(f"{row['block']:22s} convs={row['convs']}  fused block {row['fused_us']:6.1f} us  "
              f"ops alone {row['kernels_us']:6.1f} us  eager block {row['eager_us']:6.1f} us  "
              f"-> host time above the kernels: {row['host_above_kernels_per_conv_us']:.2f} us per conv")
