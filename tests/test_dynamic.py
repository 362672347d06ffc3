"""Dynamic shapes and export: torch.compile(dynamic=True) traces both operators once for every input
size (no recompile per size), and torch.export captures a module using both as msfast operators
that run, and survive a save / load round trip, at sizes other than the traced one.

Compiled autograd traces the operators' backward. CUDA graph capture and replay is in
test_cuda.py::test_graph_capture_and_replay.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import GRAD_TOL, randn, tol
from torch._dynamo.utils import counters

import msfast
from msfast import reference

# N >= 2 everywhere: dynamo specializes dimensions of size 0 and 1. The first shape's sizes are all
# distinct (with feat's 6 channels), or duck sizing would tie them together in the first graph.
SHAPES = [(2, 3, 16, 20), (3, 3, 18, 26), (5, 3, 9, 11), (4, 3, 31, 17), (2, 3, 40, 40)]


class Net(torch.nn.Module):
    """An image pyramid (normalized, antialiased) fused back at the input's resolution."""

    def __init__(self):
        super().__init__()
        self.pyramid = msfast.nn.ImagePyramid(scales=[1.0, 0.5, 0.25], mean=[0.1, 0.2, 0.3], std=[0.5, 1.0, 2.0])
        self.fuse = msfast.nn.UpsampleConcat(mode="bilinear")

    def forward(self, x, feat):
        return self.fuse([*self.pyramid(x), feat], (x.shape[2], x.shape[3]))


def _expected(x, feat):
    levels = reference.pyramid(x, [1.0, 0.5, 0.25], mean=[0.1, 0.2, 0.3], std=[0.5, 1.0, 2.0])
    return reference.upsample_concat([*levels, feat], (x.shape[2], x.shape[3]))


def _inputs(gen, shape, device, requires_grad=False):
    x = randn(gen, *shape, device=device, requires_grad=requires_grad)
    feat = randn(gen, shape[0], 6, 5, 7, device=device, requires_grad=requires_grad)
    return x, feat


@pytest.mark.parametrize("dynamic,max_compiles", [(True, 1), (None, 2)], ids=["dynamic_true", "automatic"])
def test_compile_does_not_recompile_per_size(dynamic, max_compiles, device, gen):
    """dynamic=True: one graph for all sizes; the default (automatic dynamic): a static graph for the
    first size, then one dynamic graph for all the others. Forward and backward against eager."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(Net(), backend="aot_eager", dynamic=dynamic, fullgraph=True)
    for shape in SHAPES:
        x, feat = _inputs(gen, shape, device, requires_grad=True)
        y = compiled(x, feat)
        want = _expected(x, feat)
        torch.testing.assert_close(y, want, **tol(torch.float32, upscale=True))
        grads = torch.autograd.grad((y * y).sum(), [x, feat])
        want_grads = torch.autograd.grad((want * want).sum(), [x, feat])
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, **GRAD_TOL)
    # Graphs kept, not backend calls: dynamo restarts its first trace once to turn the module's
    # float scales into constants, which calls the backend twice for one graph.
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= max_compiles, f"{graphs} graphs for {len(SHAPES)} sizes"


def test_export_runs_at_other_sizes(device, gen):
    x, feat = _inputs(gen, SHAPES[0], device)
    batch, h, w = torch.export.Dim("batch", min=2), torch.export.Dim("h", min=8), torch.export.Dim("w", min=8)
    ep = torch.export.export(Net(), (x, feat), dynamic_shapes={"x": {0: batch, 2: h, 3: w}, "feat": {0: batch}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"msfast.pyramid.default", "msfast.upsample_concat.default"} <= targets, targets
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for shape in SHAPES[1:3]:
        x, feat = _inputs(gen, shape, device)
        want = _expected(x, feat)
        for prog in (ep, loaded):
            torch.testing.assert_close(prog.module()(x, feat), want, **tol(torch.float32, upscale=True))


def test_compiled_autograd_traces_the_backward(gen):
    """Compiled autograd (torch._dynamo.compiled_autograd) traces the backward of both operators
    (their C++ torch::autograd::Function, csrc/autograd.cpp) and gives the eager gradients."""
    from torch._dynamo import compiled_autograd

    x = randn(gen, 2, 3, 16, 20, dtype=torch.float64).requires_grad_()
    feat = randn(gen, 2, 6, 9, 7, dtype=torch.float64).requires_grad_()
    want = torch.autograd.grad(Net()(x, feat).square().sum(), (x, feat))
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        Net()(x, feat).square().sum().backward()
    torch.testing.assert_close((x.grad, feat.grad), want, rtol=0, atol=0)
    torch.testing.assert_close(want[0], torch.autograd.grad(_expected(x, feat).square().sum(), x)[0],
                               rtol=1e-10, atol=1e-10)
