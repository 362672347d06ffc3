"""How a call reaches the operators. msfast.pyramid and msfast.upsample_concat call msfast._C's
typed entry points for plain tensors (csrc/module.cpp: torch.ops' boxed argument conversion
cost about 5 us a small call) and torch.ops otherwise; both go through the dispatcher. And the
autograd kernels (csrc/autograd.cpp) record a graph only where one is needed.

Checked here: the two routes give the same bits; tensor subclasses, torch_function modes and
torch.compile take torch.ops; torch_dispatch modes, the profiler and torch.jit.trace see the
operator on either route; no graph without grad, one with it; and the cache of checked pyramid
arguments (msfast/_args.py) returns only what the checks would. torch.func transforms and
forward-mode AD: tests/test_func.py."""

from __future__ import annotations

import pytest
import torch
from conftest import GRAD_TOL, DispatchLog, make_input, randn, ref_pyramid, ref_upsample_concat, tol
from torch.overrides import TorchFunctionMode

import msfast
from msfast import _ops

OPS = torch.ops.msfast


class _NoTorchOps:
    """Stands in for msfast._ops._OPS: any use of torch.ops fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"torch.ops.msfast.{name} was called")


def _concat_inputs(gen, device, dtype=torch.float32, channels_last=False):
    return [randn(gen, 2, c, h, w, dtype=dtype, device=device, channels_last=channels_last)
            for c, h, w in [(3, 9, 7), (2, 4, 5), (4, 12, 14)]]


PYRAMID_CALLS = [
    # (input dtype, layout, keyword arguments)
    (torch.float32, "nchw", dict(scales=[1.0, 0.5, 0.3])),
    (torch.float32, "channels_last", dict(sizes=[(5, 7), (20, 9)], mode="bicubic", align_corners=True)),
    (torch.bfloat16, "nchw", dict(scales=[0.25], mode="area")),
    (torch.float64, "nhwc_permuted", dict(scales=[2.0, 0.7], mode="nearest-exact")),
    (torch.uint8, "channels_last", dict(scales=[0.5, 0.5], mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25],
                                        out_dtype=torch.float16)),
]


@pytest.mark.parametrize("dtype,layout,kw", PYRAMID_CALLS, ids=lambda v: str(v).replace("torch.", "")[:24])
def test_pyramid_entry_equals_torch_ops(dtype, layout, kw, device, gen, monkeypatch):
    x = make_input(gen, (2, 3, 17, 23), dtype, device, layout)
    via_ops = msfast.pyramid(x.as_subclass(_Traced), **kw)  # a subclass takes torch.ops
    monkeypatch.setattr(_ops, "_OPS", _NoTorchOps())
    direct = msfast.pyramid(x, **kw)
    assert len(direct) == len(via_ops)
    for d, o, r in zip(direct, via_ops, ref_pyramid(x, **kw)):
        assert type(d) is torch.Tensor
        torch.testing.assert_close(d, o.as_subclass(torch.Tensor), rtol=0, atol=0)
        torch.testing.assert_close(d, r, **tol(d.dtype))
        assert d.is_contiguous(memory_format=torch.channels_last) == r.is_contiguous(
            memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("out", [False, True], ids=["fresh", "out"])
def test_upsample_concat_entry_equals_torch_ops(layout, out, device, gen, monkeypatch):
    feats = _concat_inputs(gen, device, channels_last=layout == "channels_last")
    size = (10, 11)
    want = ref_upsample_concat(feats, size, mode="bilinear")
    via_ops = msfast.upsample_concat([f.as_subclass(_Traced) for f in feats], size).as_subclass(torch.Tensor)
    monkeypatch.setattr(_ops, "_OPS", _NoTorchOps())
    if out:
        buf = torch.empty_like(want).normal_(generator=None)
        got = msfast.upsample_concat(feats, size, out=buf)
        assert got is buf
    else:
        got = msfast.upsample_concat(feats, size)
    torch.testing.assert_close(got, via_ops, rtol=0, atol=0)
    torch.testing.assert_close(got, want, **tol(torch.float32))


def test_entry_gradients_match_the_reference(device, gen, monkeypatch):
    """The typed entry points record the same C++ autograd graph as torch.ops."""
    monkeypatch.setattr(_ops, "_OPS", _NoTorchOps())
    x = randn(gen, 2, 3, 12, 10, device=device, requires_grad=True)
    feats = [f.requires_grad_(True) for f in _concat_inputs(gen, device)]
    levels = msfast.pyramid(x, [1.0, 0.5], std=[0.5, 1.0, 2.0])
    out = msfast.upsample_concat(feats, (6, 8))
    assert "PyramidFn" in levels[0].grad_fn.name() and "UpsampleConcatFn" in out.grad_fn.name()
    gl = [randn(gen, *t.shape, device=device) for t in levels]
    go = randn(gen, *out.shape, device=device)
    got = torch.autograd.grad(levels + [out], [x] + feats, gl + [go])
    xr = x.detach().requires_grad_(True)
    fr = [f.detach().requires_grad_(True) for f in feats]
    want = torch.autograd.grad(ref_pyramid(xr, [1.0, 0.5], std=[0.5, 1.0, 2.0]) + [ref_upsample_concat(fr, (6, 8))],
                               [xr] + fr, gl + [go])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **GRAD_TOL)


# ------------------------------------------------------------ which route a call takes


class _Traced(torch.Tensor):
    """A tensor subclass that records the functions its __torch_function__ sees."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _FunctionLog(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_subclass_torch_function_sees_the_operators(gen):
    x = randn(gen, 1, 3, 8, 8).as_subclass(_Traced)
    _Traced.seen = []
    levels = msfast.pyramid(x, [0.5])
    msfast.upsample_concat([x, levels[0]], (8, 8))
    msfast.upsample_concat([x], (8, 8), out=torch.empty(1, 3, 8, 8).as_subclass(_Traced))
    assert OPS.pyramid.default in _Traced.seen
    assert OPS.upsample_concat.default in _Traced.seen
    assert OPS.upsample_concat.out in _Traced.seen


def test_torch_function_mode_sees_the_operators(gen):
    x = randn(gen, 1, 3, 8, 8)
    with _FunctionLog() as log:
        levels = msfast.pyramid(x, [0.5])
        out = msfast.upsample_concat([x, levels[0]], (8, 8))
        msfast.upsample_concat([x, levels[0]], (8, 8), out=torch.empty_like(out))
    assert {OPS.pyramid.default, OPS.upsample_concat.default, OPS.upsample_concat.out} <= set(log.seen)
    torch.testing.assert_close(levels[0], ref_pyramid(x, [0.5])[0], **tol(torch.float32))


def test_torch_dispatch_mode_and_profiler_see_the_direct_route(gen, monkeypatch):
    """The typed entry points go through the dispatcher, which hands the call to a
    torch_dispatch mode and records it for the profiler."""
    monkeypatch.setattr(_ops, "_OPS", _NoTorchOps())
    x = randn(gen, 1, 3, 8, 8)
    with DispatchLog() as log:
        levels = msfast.pyramid(x, [0.5])
        msfast.upsample_concat([x, levels[0]], (8, 8))
    seen = {f for f, _ in log.calls}
    assert OPS.pyramid.default in seen and OPS.upsample_concat.default in seen
    with torch.profiler.profile() as prof:
        msfast.pyramid(x, [0.5])
        msfast.upsample_concat([x], (4, 4))
    names = {e.key for e in prof.key_averages()}
    assert {"msfast::pyramid", "msfast::upsample_concat"} <= names, names


def test_compile_traces_torch_ops(gen):
    """Under torch.compile the wrapper calls torch.ops (Dynamo cannot trace an extension's
    function): one graph, no break, same values."""
    x = randn(gen, 1, 3, 16, 12)
    feats = _concat_inputs(gen, "cpu")

    def f(x, feats):
        return msfast.pyramid(x, [1.0, 0.5])[1].sum() + msfast.upsample_concat(feats, (6, 6)).sum()

    explained = torch._dynamo.explain(f)(x, feats)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(torch.compile(f, backend="eager")(x, feats), f(x, feats), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_operators(gen, monkeypatch):
    """torch.jit.trace records calls at the dispatcher, so the typed entry points are traced."""
    monkeypatch.setattr(_ops, "_OPS", _NoTorchOps())

    def f(x, y):
        return msfast.pyramid(x, [1.0, 0.5])[1] * 2 + msfast.upsample_concat([x, y], (4, 4))[:, :3]

    traced = torch.jit.trace(f, (randn(gen, 1, 3, 8, 8), randn(gen, 1, 2, 4, 4)))
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert {"msfast::pyramid", "msfast::upsample_concat"} <= kinds, kinds
    x, y = randn(gen, 1, 3, 8, 8), randn(gen, 1, 2, 4, 4)
    torch.testing.assert_close(traced(x, y), f(x, y), rtol=0, atol=0)


# ------------------------------------------------------------ autograd records only where needed


def test_no_graph_without_grad(gen):
    x = randn(gen, 1, 3, 8, 8, requires_grad=True)
    plain = randn(gen, 1, 3, 8, 8)
    with torch.no_grad():
        assert msfast.pyramid(x, [0.5])[0].grad_fn is None
        assert not msfast.upsample_concat([x, plain], (4, 4)).requires_grad
    with torch.inference_mode():
        level = msfast.pyramid(x, [0.5])[0]
        assert level.is_inference() and not level.requires_grad
    # grad mode, but no input requires grad
    assert not msfast.pyramid(plain, [0.5])[0].requires_grad
    assert not msfast.upsample_concat([plain, plain], (4, 4)).requires_grad
    # one input of several requires grad: a graph, and the gradient reaches it
    out = msfast.upsample_concat([plain, x], (4, 4))
    assert "UpsampleConcatFn" in out.grad_fn.name()
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0


def test_backward_ops_without_grad_record_nothing(gen):
    """The backward operators called directly, no input requiring grad: plain results."""
    g = randn(gen, 1, 3, 4, 4)
    gx = OPS.pyramid_backward([g, None], [1, 3, 8, 8], [0.5, 1.0], "bilinear", False, False, None,
                              torch.float32, False, False)
    assert gx.grad_fn is None and gx.shape == (1, 3, 8, 8)
    parts = OPS.upsample_concat_backward(randn(gen, 1, 5, 6, 6), [2, 3, 3, 3, 4, 4], "bilinear", False, False,
                                        [False, False])
    assert [p.shape[1] for p in parts] == [2, 3] and all(p.grad_fn is None for p in parts)


# ------------------------------------------------------------ the cache of checked arguments


def test_checked_arguments_are_reused(gen):
    from msfast import _args

    x = randn(gen, 2, 3, 20, 30)
    _args._PYRAMID_ARGS.clear()
    a = _args.pyramid_args(x, [1.0, 0.5], None, "bilinear", None, None, [0.1, 0.2, 0.3], None, None)
    b = _args.pyramid_args(x.clone(), [1.0, 0.5], None, "bilinear", None, None, [0.1, 0.2, 0.3], None, None)
    assert a is b and len(_args._PYRAMID_ARGS) == 1
    assert a.sizes == [(20, 30), (10, 15)] and a.antialias is True and a.mean == [0.1, 0.2, 0.3]
    # another shape, another entry with its own sizes
    c = _args.pyramid_args(randn(gen, 2, 3, 8, 6), [1.0, 0.5], None, "bilinear", None, None, [0.1, 0.2, 0.3],
                           None, None)
    assert c.sizes == [(8, 6), (4, 3)] and len(_args._PYRAMID_ARGS) == 2
    # values without an exact key (a tensor mean) are checked every time, not stored
    mean = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    d = _args.pyramid_args(x, [1.0, 0.5], None, "bilinear", None, None, mean, None, None)
    assert d.mean == a.mean and len(_args._PYRAMID_ARGS) == 2
    for i in range(_args._PYRAMID_ARGS_MAX + 10):
        _args.pyramid_args(x, [1.0 + i], None, "nearest", None, None, None, None, None)
    assert 0 < len(_args._PYRAMID_ARGS) <= _args._PYRAMID_ARGS_MAX


# Calls equal (==) to a valid, already cached call, which must still raise: True == 1 == 1.0.
CONFLATED = [
    (dict(scales=[1, 0.5]), dict(scales=[True, 0.5]), TypeError, "scales"),
    (dict(scales=[0.5], antialias=True), dict(scales=[0.5], antialias=1), TypeError, "antialias"),
    (dict(scales=[0.5], align_corners=False), dict(scales=[0.5], align_corners=0), TypeError, "align_corners"),
    (dict(sizes=[(1, 5)]), dict(sizes=[(True, 5)]), TypeError, "sizes"),
    (dict(scales=[0.5], mean=[1, 0, 0]), dict(scales=[0.5], mean=[True, 0, 0]), TypeError, "mean"),
    (dict(scales=[0.5], std=[1, 1, 1]), dict(scales=[0.5], std=[True, 1, 1]), TypeError, "std"),
]


def test_cached_arguments_keep_the_sign_of_zero(gen):
    """mean=[-0.0] equals mean=[0.0] in Python, but not in its results: x = -0.0 minus 0.0 is
    -0.0, minus -0.0 is +0.0 (in the reference path too)."""
    x = torch.zeros(1, 3, 4, 4).neg_()
    for mean, sign in (([0.0] * 3, -1.0), ([-0.0] * 3, 1.0), ([0.0] * 3, -1.0)):
        got = msfast.pyramid(x, [1.0], mode="nearest", mean=mean)[0]
        want = ref_pyramid(x, [1.0], mode="nearest", mean=mean)[0]
        assert torch.equal(torch.copysign(torch.ones_like(got), got), torch.full_like(got, sign))
        assert torch.equal(torch.copysign(torch.ones_like(want), want), torch.full_like(want, sign))


@pytest.mark.parametrize("valid,bad,exc,name", CONFLATED, ids=[c[3] for c in CONFLATED])
def test_cached_arguments_do_not_admit_equal_bad_ones(valid, bad, exc, name, gen):
    x = randn(gen, 1, 3, 8, 10)
    good = msfast.pyramid(x, **valid)
    torch.testing.assert_close(good[0], ref_pyramid(x, **valid)[0], **tol(torch.float32))
    for _ in range(2):
        with pytest.raises(exc, match=name):
            msfast.pyramid(x, **bad)


def test_checked_concat_arguments_are_reused(gen):
    from msfast import _args

    feats = _concat_inputs(gen, "cpu")
    _args._CONCAT_ARGS.clear()
    a = _args.concat_args(feats, (10, 11), "bilinear", None, None)
    clones = [f.clone() for f in feats]
    b = _args.concat_args(clones, [10, 11], "bilinear", None, None)
    assert len(_args._CONCAT_ARGS) == 1 and a[1:] == b[1:] == ((10, 11), "bilinear", False)
    assert len(b[0]) == 3 and all(x is y for x, y in zip(b[0], clones))  # the call's own tensors
    # out= is checked every time (its checks look at the tensor's memory), and not stored
    out = torch.empty(2, 9, 10, 11)
    _args.concat_args(feats, (10, 11), "bilinear", None, out)
    with pytest.raises(ValueError, match="overlap"):
        _args.concat_args([out[:, :3]] + feats[1:], (10, 11), "bilinear", None, out)
    assert len(_args._CONCAT_ARGS) == 1
    for i in range(_args._PYRAMID_ARGS_MAX + 10):
        _args.concat_args(feats, (4, 5 + i), "nearest", None, None)
    assert 0 < len(_args._CONCAT_ARGS) <= _args._PYRAMID_ARGS_MAX


# Calls equal (==) to a valid, already cached concat call, which must still raise.
CONCAT_CONFLATED = [
    (dict(size=(1, 4)), dict(size=(True, 4)), TypeError, "size"),
    (dict(size=(6, 4), align_corners=False), dict(size=(6, 4), align_corners=0), TypeError, "align_corners"),
    (dict(size=(6, 4), mode="nearest"), dict(size=(6, 4), mode="nearest", align_corners=False), ValueError,
     "align_corners"),
]


@pytest.mark.parametrize("valid,bad,exc,name", CONCAT_CONFLATED, ids=[c[3] + str(i) for i, c in
                                                                     enumerate(CONCAT_CONFLATED)])
def test_cached_concat_arguments_do_not_admit_equal_bad_ones(valid, bad, exc, name, gen):
    feats = _concat_inputs(gen, "cpu")
    good = msfast.upsample_concat(feats, **valid)
    want = ref_upsample_concat(feats, valid["size"], mode=valid.get("mode", "bilinear"),
                               align_corners=valid.get("align_corners"))
    torch.testing.assert_close(good, want, **tol(torch.float32))
    for _ in range(2):
        with pytest.raises(exc, match=name):
            msfast.upsample_concat(feats, **bad)
