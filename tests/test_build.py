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
