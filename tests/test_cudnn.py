"""The ``cudnn`` backend: every cuDNN graph built, validated and planned without a GPU against the
stored sm80/sm90 device properties; the graph cache's keys; the fallback path; and, on a GPU,
every graph executed against the reference.

Planning here (cuDNN 9.24, no libcuda): the pre-built engines give definite answers; graphs
served only by engines compiled at run time report ``needs_runtime_compilation`` ("cannot tell
here"), which only a GPU run resolves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fusedres.ops import _ref
from fusedres.ops import cudnn
from tests.conftest import assert_matches_reference, fused_ops

DATA = Path(__file__).parent / "data" / "cudnn-device-properties"
ARCHS = {"sm80": DATA / "a100.json", "sm90": DATA / "h200.json"}
DEFINITE = {"planned", "needs_runtime_compilation", "unsupported"}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

needs_planner = pytest.mark.skipif(not cudnn.loaded(), reason=f"cuDNN backend not available: {cudnn.LOAD_ERROR}")


@pytest.fixture(scope="module", params=sorted(ARCHS))
def props(request) -> cudnn.DeviceProperties:
    return cudnn.DeviceProperties.from_file(ARCHS[request.param])


def _conv(pattern: str, **kw) -> cudnn.Graph:
    return cudnn.Graph(pattern, (8, 64, 14, 14), (64, 64, 3, 3), padding=(1, 1), **kw)


# --- planning without a GPU ------------------------------------------------------------------------


def test_stored_properties_describe_sm80_and_sm90():
    assert {cudnn.DeviceProperties.from_file(p).sm_version for p in ARCHS.values()} == {80, 90}


@pytest.mark.cudnn
@needs_planner
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label", sorted(cudnn.SUPPORT_GRAPHS))
def test_every_graph_validates_and_gets_a_definite_status(label, dtype, props):
    r = cudnn.plan(cudnn.SUPPORT_GRAPHS[label], dtype, props)
    assert r["validated"], r
    assert r["status"] in DEFINITE, r
    if r["status"] == "planned":
        assert r["num_plans"] > 0 and r["workspace"] >= 0, r
    else:
        assert r["message"], "a graph that did not plan must say why"


# What cuDNN 9.24 plans here with pre-built engines (NVIDIA's MLPerf fp16 path), on both archs.
PLANNED_FP16 = ["conv_bn_stats (conv-genstats)", "conv_bn_stats + BN-ReLU prologue", "bn_finalize", "wgrad",
                "wgrad + BN-ReLU prologue", "dgrad"]


@pytest.mark.cudnn
@needs_planner
@pytest.mark.parametrize("label", PLANNED_FP16)
def test_fp16_mlperf_graphs_plan_on_sm80_and_sm90(label, props):
    r = cudnn.plan(cudnn.SUPPORT_GRAPHS[label], torch.float16, props)
    assert r["status"] == "planned", r
    assert r["num_plans"] >= 1


@pytest.mark.cudnn
@needs_planner
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_convs_and_finalize_plan_in_every_dtype(dtype, props):
    for label in ("bn_finalize", "wgrad", "dgrad"):
        assert cudnn.plan(cudnn.SUPPORT_GRAPHS[label], dtype, props)["status"] == "planned", label


@pytest.mark.cudnn
@needs_planner
def test_fp32_without_tf32_drops_tensor_core_engines(props):
    graph = cudnn.SUPPORT_GRAPHS["dgrad"]
    strict = cudnn.plan(graph, torch.float32, props, allow_tf32=False)
    tf32 = cudnn.plan(graph, torch.float32, props, allow_tf32=True)
    assert strict["status"] == tf32["status"] == "planned"
    assert strict["graph_id"] != tf32["graph_id"]
    assert strict["num_plans"] <= tf32["num_plans"]


@pytest.mark.cudnn
@needs_planner
@pytest.mark.parametrize("x,w", [((8, 64, 14, 14), (64, 48, 3, 3)),  # 64 channels, filters of 48
                                 ((8, 64, 2, 2), (64, 64, 5, 5))])   # filter larger than the image
def test_a_malformed_graph_is_invalid_not_unsupported(x, w, props):
    r = cudnn.plan(cudnn.Graph("conv_bn_stats", x, w, padding=(0, 0)), torch.float16, props)
    assert r["status"] == "invalid" and "BAD_PARAM" in r["message"], r


@pytest.mark.cudnn
@needs_planner
def test_a_malformed_request_names_the_field():
    with pytest.raises(ValueError, match="dtype"):
        cudnn.plan(_conv("conv_bn_stats"), torch.float64, cudnn.DeviceProperties.from_file(ARCHS["sm80"]))
    for request, field in (({"pattern": "conv_bn_relu", "dtype": "float16"}, "unknown pattern"),
                           ({"pattern": "dgrad", "dtype": "float16"}, "needs x and w"),
                           ({"pattern": "dgrad", "dtype": "float16", "x": {"dim": [1, 2]}}, "dim must be a list of 4")):
        with pytest.raises(ValueError, match=field):
            cudnn._call_c(cudnn._lib.fusedres_cudnn_plan_json, json.dumps(request).encode())


# --- the graph cache ----------------------------------------------------------------------------


@pytest.mark.cudnn
@needs_planner
def test_same_key_reuses_the_cached_graph(props):
    graph = _conv("conv_bn_stats", prologue=True)
    first = cudnn.plan(graph, torch.float16, props)
    size = cudnn.cache_size()
    again = cudnn.plan(graph, torch.float16, props)
    assert again["cache_hit"] and again["graph_id"] == first["graph_id"]
    assert cudnn.cache_size() == size


@pytest.mark.cudnn
@needs_planner
@pytest.mark.parametrize("change", ["batch", "spatial", "filter", "stride", "padding", "x_strides", "dtype",
                                    "arch", "prologue"])
def test_any_change_of_the_key_builds_a_new_graph(change):
    base = dict(x=(8, 64, 14, 14), w=(64, 64, 3, 3), padding=(1, 1), prologue=True)
    dtype, arch = torch.float16, "sm80"
    if change == "batch":
        base["x"] = (4, 64, 14, 14)
    elif change == "spatial":
        base["x"] = (8, 64, 13, 13)
    elif change == "filter":
        base["w"] = (32, 64, 3, 3)
    elif change == "stride":
        base["stride"] = (2, 2)
    elif change == "padding":
        base["padding"] = (0, 0)
    elif change == "x_strides":  # NCHW-contiguous instead of channels_last
        base["strides"] = {"x": (64 * 14 * 14, 14 * 14, 14, 1)}
    elif change == "dtype":
        dtype = torch.bfloat16
    elif change == "arch":
        arch = "sm90"
    elif change == "prologue":
        base["prologue"] = False
    reference = cudnn.plan(_conv("conv_bn_stats", prologue=True), torch.float16,
                           cudnn.DeviceProperties.from_file(ARCHS["sm80"]))
    size = cudnn.cache_size()
    changed = cudnn.plan(cudnn.Graph("conv_bn_stats", **base), dtype, cudnn.DeviceProperties.from_file(ARCHS[arch]))
    if changed["cache_hit"]:  # built by an earlier test: still a different entry
        assert changed["graph_id"] != reference["graph_id"]
    else:
        assert cudnn.cache_size() == size + 1
        assert changed["graph_id"] != reference["graph_id"]


# --- the fallback path ----------------------------------------------------------------------------


def _conv_bn_act_args(device="cpu", dtype=torch.float32):
    x = torch.randn(2, 8, 9, 9, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    scale = torch.rand(16, device=device) + 0.5
    shift = torch.randn(16, device=device)
    return (x, w, scale, shift, None, [1, 1], [1, 1], [1, 1], 1, True, 1)


@pytest.fixture
def fresh_fallback_state(monkeypatch):
    monkeypatch.setattr(cudnn, "_not_offered", {})
    monkeypatch.setattr(cudnn, "_warned", set())


def test_a_case_cudnn_does_not_offer_falls_back_once_with_the_reason(monkeypatch, fresh_fallback_state):
    from fusedres import _extension

    if not _extension.loaded():
        pytest.skip("needs fusedres._C (the native backend is the fallback under test)")
    calls = []

    def not_offered(*args):
        calls.append(args)
        raise RuntimeError(f"{cudnn.NOT_OFFERED} conv_bn_act (unsupported at check_support): no engine for this")

    monkeypatch.setattr(cudnn, "cudnn_op", lambda name: not_offered)
    args = _conv_bn_act_args()
    run = cudnn.op("conv_bn_act")
    with pytest.warns(UserWarning, match=r"'cudnn' falls back to 'native'.*no engine for this"):
        with fused_ops() as log:
            out = run(*args)
    assert dict(log.counts) == {"conv_bn_act": 1}, "the native op must have run"
    torch.testing.assert_close(out, torch.ops.fusedres.conv_bn_act(*args), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(*args)  # the same case: no second warning, cuDNN not asked again
    assert len(calls) == 1


def test_other_errors_are_not_swallowed(monkeypatch, fresh_fallback_state):
    def broken(*args):
        raise RuntimeError("fusedres cudnn: conv_bn_act failed at execute: CUDNN_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(cudnn, "cudnn_op", lambda name: broken)
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        cudnn.op("conv_bn_act")(*_conv_bn_act_args())


def test_the_backend_is_unusable_on_the_cpu():
    assert "CUDA device" in cudnn.unusable_reason(torch.device("cpu"))


def test_backend_registration():
    from fusedres import backends

    assert "cudnn" in backends.BACKENDS
    assert backends._FALLBACK_ORDER[:2] == ("cudnn", "native")
    assert "CUDA device" in backends.unusable_reason("cudnn", torch.device("cpu"), torch.float16)
    assert "cudnn" not in backends.auto_candidates(torch.device("cpu"), torch.float32)


def test_cudnn_on_the_cpu_falls_back_to_native_with_a_warning(monkeypatch):
    from fusedres import _extension, backends

    if not _extension.loaded():
        pytest.skip("needs fusedres._C (the native backend is the fallback under test)")
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_named_choice", {})
    x, w, scale, shift = _conv_bn_act_args()[:4]
    with pytest.warns(UserWarning, match=r"backend 'cudnn' falls back to 'native'.*CUDA device"):
        with fused_ops() as log:
            out = fusedres_conv_bn_act(x, w, scale, shift, padding=1, backend="cudnn")
    assert dict(log.counts) == {"conv_bn_act": 1}, dict(log.counts)
    torch.testing.assert_close(out, torch.ops.fusedres.conv_bn_act(*_with(x, w, scale, shift)), rtol=0, atol=0)


def test_auto_never_times_while_a_cuda_graph_is_captured(monkeypatch):
    from fusedres import _extension, backends

    if not (_extension.with_cuda_kernels() and cudnn.loaded()):
        pytest.skip("needs the CUDA build (candidates are counted, nothing runs)")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(backends, "_auto_choice", {})
    cuda = torch.device("cuda")
    candidates = backends.auto_candidates(cuda, torch.float16)
    assert "cudnn" in candidates and len(candidates) > 1

    def run(_):
        raise AssertionError("timed during capture")

    assert backends.resolve("auto", cuda, torch.float16, ("op",), run) == candidates[0]
    assert backends.resolve_train("auto", cuda, torch.float16, ("block",), run) == \
        backends.train_candidates(cuda, torch.float16)[0]
    assert backends._auto_choice == {}, "a choice made during capture must not be cached"


def fusedres_conv_bn_act(*args, **kwargs):
    import fusedres

    return fusedres.conv_bn_act(*args, **kwargs)


def _with(x, w, scale, shift):
    return (x, w, scale, shift, None, [1, 1], [1, 1], [1, 1], 1, True, 1)


@needs_planner
@pytest.mark.parametrize("name", cudnn.OPS)
def test_fake_impls_match_the_native_ops_without_a_gpu(name):
    """torch.compile sees the cudnn ops through these (the CUDA kernels need a GPU to run)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cl = dict(device="cuda", dtype=torch.float16)
        x = torch.empty(2, 8, 9, 9, **cl).contiguous(memory_format=torch.channels_last)
        w = torch.empty(16, 8, 3, 3, **cl).contiguous(memory_format=torch.channels_last)
        f32 = dict(device="cuda", dtype=torch.float32)
        conv = ([1, 1], [1, 1], [1, 1], 1)
        if name == "conv_bn_act":
            out = [cudnn.cudnn_op(name)(x, w, None, None, None, *conv, True, 1)]
            shapes = [(2, 16, 9, 9)]
        elif name == "conv_bn_stats":
            out = cudnn.cudnn_op(name)(x, w, torch.empty(8, **f32), torch.empty(8, **f32), *conv)
            shapes = [(2, 16, 9, 9), (16,), (16,)]
        elif name == "bn_finalize":
            v = torch.empty(16, **f32)
            out = cudnn.cudnn_op(name)(v, v, 162, v, v, v.clone(), v.clone(), 0.1, 1e-5)
            shapes = [(16,)] * 3
        else:
            g = torch.empty(2, 16, 9, 9, **cl).contiguous(memory_format=torch.channels_last)
            c8 = torch.empty(8, **f32)
            out = cudnn.cudnn_op(name)(g, None, None, x, w, c8, c8, c8, c8, *conv, [True, True])
            shapes = [(2, 8, 9, 9), (16, 8, 3, 3), (8,), (8,)]
        assert [tuple(t.shape) for t in out] == shapes
        assert all(t.device.type == "cuda" for t in out)


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="no op 'bn_add_act'"):
        cudnn.op("bn_add_act")


# --- the support table command ---------------------------------------------------------------------


@pytest.mark.cudnn
@needs_planner
def test_support_table_command():
    out = subprocess.run([sys.executable, "-m", "fusedres", "cudnn-support"], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert "| graph | dtype | sm80 | sm90 |" in out.stdout
    assert "| conv_bn_stats + BN-ReLU prologue | float16 | planned" in out.stdout


@pytest.mark.cudnn
@needs_planner
def test_readme_support_table_is_the_generated_one():
    """README.md's table is `python -m fusedres cudnn-support`'s (regenerate it when this fails)."""
    props = [cudnn.DeviceProperties.from_file(ARCHS[a]) for a in sorted(ARCHS)]
    table = cudnn.format_support_table(cudnn.support_table(props))
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert table in readme


# --- on a GPU: every graph executed against the reference ------------------------------------------


def _run_or_skip(op, *args):
    """The cudnn op itself (no fallback), or a skip naming cuDNN's reason when it offers none."""
    try:
        return op(*args)
    except RuntimeError as exc:
        if cudnn.NOT_OFFERED in str(exc):
            pytest.skip(str(exc).split(cudnn.NOT_OFFERED, 1)[1].splitlines()[0])
        raise


GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32, "tf32"]


@pytest.fixture(params=GPU_DTYPES, ids=str)
def gpu_dtype(request):
    """(dtype, tolerance key): fp32 runs with TF32 off (exact) and on."""
    tf32 = request.param == "tf32"
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    yield (torch.float32 if tf32 else request.param), request.param
    torch.backends.cudnn.allow_tf32 = previous


def _nhwc(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.cudnn
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("ksize,stride", [(3, 1), (1, 1), (3, 2)])
def test_gpu_conv_bn_act(gpu_dtype, residual, ksize, stride, poison_outputs):
    dtype, tol = gpu_dtype
    x, w = _nhwc(4, 32, 13, 13, dtype=dtype), _nhwc(64, 32, ksize, ksize, dtype=dtype, scale=0.1)
    scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    pad = ksize // 2
    p = (13 + 2 * pad - ksize) // stride + 1
    res = _nhwc(4, 64, p, p, dtype=dtype) if residual else None
    args = ([stride] * 2, [pad] * 2, [1, 1], 1, True, 1)
    with fused_ops() as log:
        out = _run_or_skip(torch.ops.fusedres.conv_bn_act_cudnn, x, w, scale, shift, res, *args)
    assert set(log.counts) == {"conv_bn_act_cudnn"}
    d = lambda t: None if t is None else t.double()  # noqa: E731
    expected = _ref.conv_bn_act(d(x), d(w), d(scale), d(shift), d(res), *args)
    baseline = _ref.conv_bn_act(x, w, scale, shift, res, *args)
    assert_matches_reference(out, expected, tol, baseline=baseline)


@pytest.mark.cuda
@pytest.mark.cudnn
@pytest.mark.parametrize("prologue", [False, True])
def test_gpu_conv_bn_stats(gpu_dtype, prologue, poison_outputs):
    dtype, tol = gpu_dtype
    x, w = _nhwc(4, 64, 14, 14, dtype=dtype), _nhwc(64, 64, 3, 3, dtype=dtype, scale=0.05)
    scale = torch.rand(64, device="cuda") + 0.5 if prologue else None
    shift = torch.randn(64, device="cuda") if prologue else None
    if prologue:  # the graph takes the prologue in the io dtype: compare against that rounding
        scale, shift = scale.to(dtype).float(), shift.to(dtype).float()
    args = ([1, 1], [1, 1], [1, 1], 1)
    y, mean, m2 = _run_or_skip(torch.ops.fusedres.conv_bn_stats_cudnn, x, w, scale, shift, *args)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ey, emean, em2 = _ref.conv_bn_stats(d(x), d(w), d(scale), d(shift), *args)
    by, bmean, bm2 = _ref.conv_bn_stats(x, w, scale, shift, *args)
    assert_matches_reference(y, ey, tol, baseline=by, what="y")
    # The statistics describe y as stored: compare with the statistics of the returned y.
    _, smean, sm2 = _ref.conv_bn_stats(y.double(), torch.eye(64, device="cuda", dtype=torch.float64)
                                       .view(64, 64, 1, 1), None, None, [1, 1], [0, 0], [1, 1], 1)
    # Exact for fp32 y; a low-precision y may be summed before its rounding (~1e-4 of max|mean|).
    stats_tol = torch.float32 if tol == torch.float32 else "tf32"
    assert_matches_reference(mean, smean, stats_tol, what="mean")
    assert_matches_reference(m2, sm2, "tf32", what="m2")  # m2 = sumsq - sum * mean in fp32


@pytest.mark.cuda
@pytest.mark.cudnn
def test_gpu_bn_finalize(poison_outputs):
    k, count = 64, 10  # a small count: a biased running variance would be 10% off
    mean, m2 = torch.randn(k, device="cuda"), (torch.rand(k, device="cuda") + 0.5) * count
    weight, bias = torch.rand(k, device="cuda") + 0.5, torch.randn(k, device="cuda")
    rm, rv = torch.randn(k, device="cuda"), torch.rand(k, device="cuda") + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    scale, shift, invstd = _run_or_skip(torch.ops.fusedres.bn_finalize_cudnn, mean, m2, count, weight, bias, rm, rv,
                                        0.1, 1e-5)
    es, eb, ei = _ref.bn_finalize(mean.double(), m2.double(), count, weight.double(), bias.double(), rm_ref, rv_ref,
                                  0.1, 1e-5)
    for what, a, e in (("scale", scale, es), ("shift", shift, eb), ("invstd", invstd, ei),
                       ("running_mean", rm, rm_ref), ("running_var", rv, rv_ref)):
        assert_matches_reference(a, e, torch.float32, what=what)


@pytest.mark.cuda
@pytest.mark.cudnn
@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("with_coef", [False, True])
def test_gpu_conv_bn_backward(gpu_dtype, prologue, with_coef, poison_outputs):
    dtype, tol = gpu_dtype
    n, c, k, hw = 4, 64, 64, 14
    x, w = _nhwc(n, c, hw, hw, dtype=dtype), _nhwc(k, c, 3, 3, dtype=dtype, scale=0.05)
    grad = _nhwc(n, k, hw, hw, dtype=dtype)
    grad_y = _nhwc(n, k, hw, hw, dtype=dtype) if with_coef else None
    coef = torch.stack([torch.randn(k), torch.rand(k) + 0.5, torch.randn(k) * 0.1, torch.randn(k) * 0.1]).cuda() \
        if with_coef else None
    scale = shift = mean = invstd = None
    if prologue:
        scale, shift = (torch.rand(c, device="cuda") + 0.5).to(dtype).float(), torch.randn(c, device="cuda").to(
            dtype).float()
        mean, invstd = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
    args = ([1, 1], [1, 1], [1, 1], 1, [True, True])
    gi, gw, sg, sgx = _run_or_skip(torch.ops.fusedres.conv_bn_backward_cudnn, grad, grad_y, coef, x, w, scale, shift,
                                   mean, invstd, *args)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    e = _ref.conv_bn_backward(d(grad), d(grad_y), d(coef), d(x), d(w), d(scale), d(shift), d(mean), d(invstd), *args)
    b = _ref.conv_bn_backward(grad, grad_y, coef, x, w, scale, shift, mean, invstd, *args)
    assert_matches_reference(gi, e[0], tol, baseline=b[0], what="grad_input")
    assert_matches_reference(gw, e[1], tol, baseline=b[1], what="grad_weight")
    if prologue:
        assert_matches_reference(sg, e[2], "tf32", baseline=b[2], what="sum_g")
        assert_matches_reference(sgx, e[3], "tf32", baseline=b[3], what="sum_g_xhat")


@pytest.mark.cuda
@pytest.mark.cudnn
def test_gpu_graph_is_capturable_after_warm_up():
    x, w = _nhwc(8, 64, 14, 14, dtype=torch.float16), _nhwc(64, 64, 3, 3, dtype=torch.float16, scale=0.05)
    scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    args = ([1, 1], [1, 1], [1, 1], 1)
    op = torch.ops.fusedres.conv_bn_stats_cudnn
    eager = _run_or_skip(op, x, w, scale, shift, *args)  # warm-up: plans the graph
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = op(x, w, scale, shift, *args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured[0], eager[0], rtol=0, atol=0)
    for a, b in zip(captured[1:], eager[1:]):  # the reductions may add in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.cudnn
def test_gpu_device_properties_round_trip():
    """The local GPU's real properties plan the same fp16 graph as the stored file for its arch."""
    import cudnn as cudnn_python  # the frontend's Python bindings (nvidia-cudnn-frontend)

    text = cudnn_python.create_device_properties(0).serialize()
    fields = json.loads(text)
    props = cudnn.DeviceProperties(fields["deviceName"], text, fields["deviceVer"] // 10, fields["multiProcessorCount"])
    r = cudnn.plan(cudnn.SUPPORT_GRAPHS["conv_bn_stats + BN-ReLU prologue"], torch.float16, props)
    assert r["status"] == "planned", r
