"""The pure-PyTorch fallback (MSFAST_FORCE_FALLBACK=1, in a subprocess) and, in-process, that the
compiled kernels are the ones in use."""

from __future__ import annotations

import textwrap

import torch
from conftest import run_python

import msfast

FALLBACK_SCRIPT = textwrap.dedent("""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import msfast
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    message = str(runtime[0].message)
    assert "MSFAST_FORCE_FALLBACK=1" in message and "msfast.reference" in message, message
    reason = msfast.fallback_reason()
    assert reason is not None and "MSFAST_FORCE_FALLBACK" in reason, reason
    assert not msfast.kernels_available("cpu")

    from msfast import reference

    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import importlib
        importlib.import_module("msfast")  # cached: no second warning

        x = torch.randn(2, 3, 17, 23, generator=g, requires_grad=True)
        kw = dict(scales=[1.0, 0.5, 1.7], mode="bicubic", mean=[0.1, 0.2, 0.3], std=[0.5, 1.0, 2.0])
        levels = msfast.pyramid(x, **kw)
        ref = reference.pyramid(x, **kw)
        assert all(torch.equal(a, b) for a, b in zip(levels, ref))
        w = [torch.randn(lv.shape, generator=g) for lv in levels]
        (gx,) = torch.autograd.grad(levels, x, w)
        (gx_ref,) = torch.autograd.grad(ref, x, w)
        assert torch.equal(gx, gx_ref)

        levels = msfast.pyramid(x, sizes=[(5, 40), (1, 1)], mode="area")
        assert [tuple(lv.shape) for lv in levels] == [(2, 3, 5, 40), (2, 3, 1, 1)]
        (gs,) = torch.autograd.grad(levels[0].sum(), x)
        assert gs.shape == x.shape and gs.abs().sum() > 0

        u8 = torch.randint(0, 256, (2, 17, 23, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)
        a = msfast.pyramid(u8, scales=[0.5], out_dtype=torch.float64)[0]
        assert a.dtype == torch.float64
        assert torch.equal(a, reference.pyramid(u8, scales=[0.5], out_dtype=torch.float64)[0])

        feats = [torch.randn(2, 3, 9, 11, generator=g, requires_grad=True),
                 torch.randn(2, 2, 4, 5, generator=g, requires_grad=True)]
        out = msfast.upsample_concat(feats, (7, 8), mode="bilinear")
        ref = reference.upsample_concat(feats, (7, 8), mode="bilinear")
        assert torch.equal(out, ref)
        go = torch.randn(out.shape, generator=g)
        grads = torch.autograd.grad(out, feats, go)
        grads_ref = torch.autograd.grad(ref, feats, go)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))

        buf = torch.empty(2, 5, 7, 8)
        with torch.no_grad():
            assert msfast.upsample_concat(feats, (7, 8), out=buf) is buf
        assert torch.equal(buf, ref.detach())

        try:
            msfast.pyramid(x, scales=[0.5], mode="foo")
        except ValueError as e:
            assert "mode" in str(e)
        else:
            raise AssertionError("bad mode accepted in fallback mode")
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    print("FALLBACK-OK")
""")


def test_forced_fallback_subprocess():
    proc = run_python(FALLBACK_SCRIPT, {"MSFAST_FORCE_FALLBACK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FALLBACK-OK" in proc.stdout


def test_fallback_env_other_than_1_keeps_kernels():
    proc = run_python("import msfast; print('REASON', msfast.fallback_reason())", {"MSFAST_FORCE_FALLBACK": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REASON None" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


def test_kernels_loaded_in_process():
    assert msfast.fallback_reason() is None
    assert msfast.kernels_available("cpu")
    assert msfast.kernels_available("meta")
    assert not msfast.kernels_available("xpu")
    assert hasattr(torch.ops.msfast, "pyramid") and hasattr(torch.ops.msfast, "upsample_concat")


def test_public_functions_dispatch_to_the_compiled_op():
    x = torch.randn(1, 2, 6, 7)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        msfast.pyramid(x, scales=[0.5])
        msfast.upsample_concat([x], (3, 4))
    names = {e.name for e in prof.events()}
    assert {"msfast::pyramid", "msfast::upsample_concat"} <= names
    assert not any("upsample" in n and n.startswith("aten::") for n in names), names
