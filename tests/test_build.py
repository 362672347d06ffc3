"""What was built is registered, and `msfast info` says so."""

import json
import subprocess
import sys

import pytest
import torch

import msfast
from msfast import _ops

OPS = ["pyramid", "pyramid_backward", "upsample_concat", "upsample_concat.out", "upsample_concat_backward"]


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"msfast::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered_when_built(op):
    built = _ops._C.build_info()["cuda"]
    assert built == _ops._C.cuda_built()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"msfast::{op}", "CUDA") == built


def test_info_lists_kernels():
    r = subprocess.run([sys.executable, "-m", "msfast", "info", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kernels"] == {"cpu": True, "cuda": bool(_ops._C.cuda_built())}
    if _ops._C.cuda_built():
        assert info["cuda_arch_list"]


def test_cuda_gate(monkeypatch):
    monkeypatch.delenv("MSFAST_CUDA_KERNELS", raising=False)
    assert msfast.kernels_available("cuda") == (bool(_ops._C.cuda_built()) and _ops.CUDA_KERNELS_VALIDATED)
    monkeypatch.setenv("MSFAST_CUDA_KERNELS", "0")
    assert not msfast.kernels_available("cuda")
    monkeypatch.setenv("MSFAST_CUDA_KERNELS", "1")
    assert msfast.kernels_available("cuda") == bool(_ops._C.cuda_built())


@pytest.mark.parametrize("flag", ["0", "1"])
def test_cuda_gate_is_traceable_by_torch_compile(flag, monkeypatch):
    """The device check inside msfast.* must not break a fullgraph compile (it once called into
    the extension module, which dynamo cannot trace; that showed only on a GPU)."""
    monkeypatch.setenv("MSFAST_CUDA_KERNELS", flag)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + float(msfast.kernels_available("cuda")), backend="eager", fullgraph=True)
    want = float(flag == "1" and _ops._C.cuda_built())
    torch.testing.assert_close(fn(torch.zeros(3)), torch.full((3,), want))


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        ("9.0", (9, 0), True), ("9.0", (8, 0), False), ("9.0", (10, 0), False), ("8.0", (8, 6), True),
        ("8.6", (8, 0), False), ("9.0a", (9, 0), True), ("9.0a", (10, 0), False), ("8.0+PTX", (9, 0), True),
        ("9.0+PTX", (8, 9), False), ("7.5;8.0", (8, 9), True), ("7.5 8.6", (8, 0), False), ("10.0f", (10, 3), True),
        ("Hopper", (8, 0), True),
    ],
)
def test_arch_runs_on(archs, capability, runs):
    assert _ops.arch_runs_on(archs, capability) is runs


def test_cuda_kernels_not_used_on_a_gpu_they_were_not_built_for(monkeypatch):
    """A build for 9.0 on an 8.0 GPU would fail at every launch ("no kernel image"): msfast.*
    uses the reference path there instead, says so once, and asks each GPU once."""
    monkeypatch.setattr(_ops, "kernels_available", lambda device_type: True)
    monkeypatch.setattr(_ops, "_CUDA_ARCHS", "9.0")
    monkeypatch.setattr(_ops, "_arch_ok", {})
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or {0: (8, 0), 1: (9, 0)}[i])
    with pytest.warns(RuntimeWarning, match=r"cuda:0 \(compute capability 8\.0\).*TORCH_CUDA_ARCH_LIST=8\.0"):
        assert not _ops._use_kernels(torch.device("cuda", 0))
    assert not _ops._use_kernels(torch.device("cuda", 0))
    assert _ops._use_kernels(torch.device("cuda", 1))
    assert _ops._use_kernels(torch.device("cpu"))
    assert asked == [0, 1]
