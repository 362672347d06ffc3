"""torch.func transforms and forward-mode AD for the two operators.

vmap alone: msfast.pyramid and msfast.upsample_concat call the operators, and torch.vmap runs
their batching kernels (the FuncTorchBatched dispatch key, registered by `install`), which
fold the vmapped dimension into N and make one call. Regular autograd through the vmap takes
the operators' C++ autograd on the folded call.

Grad-like transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, and vmaps of them) and
forward-mode AD (`active`): the operators' autograd formulas are C++ (csrc/autograd.cpp,
torch::autograd::Function: a few microseconds a call, and a node that compiled autograd
traces), which functorch refuses there ("cannot use C++ torch::autograd::Function with
functorch transforms"), and a C++ Function has no forward-mode formula. So the calls go through
the Python Functions below. Their formulas are the C++ ones: each operator is linear in its
tensors, so its backward is another operator, the backward of a backward is the forward again,
and an output's tangent is the operator applied to the input's tangent (without the mean,
which is not linear). Each has an explicit vmap staticmethod (functorch's generated ones cost
about 0.8 ms of Python a call on this project's Xeon) that applies the Function to the folded
batch, so that autograd records that one call; functorch's machinery around a Function still
costs about 0.3 ms a call.

Both fold with the same helpers (`_batched_*`, and msfast._C.fold: a folded batch is resized
as each sample would be alone, with the same layout and nearest formulas), so vmap gives what
a loop over the samples gives.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch._prims_common import is_channels_last_contiguous, is_contiguous

from ._args import pyramid_normalizes

_OPS = None  # the operators' overloads (msfast._ops._Overloads), set by install()
_C = None  # msfast._C, set by install()
_peek = torch._C._functorch.peek_interpreter_stack
_VMAP = torch._C._functorch.TransformType.Vmap


def active() -> bool:
    """Whether a call must take the Python Functions: with forward-mode AD on, or under a
    torch.func transform other than vmap (grad, vjp, jvp and those built on them), where
    functorch refuses the operators' C++ autograd. Under vmap alone a call goes to the operator
    and its batching kernel (below). Never while torch.compile traces (it traces the operators
    themselves)."""
    if torch.compiler.is_compiling():
        return False
    if _fwad._current_level >= 0:
        return True
    return _peek() is not None and any(i.key() != _VMAP for i in torch._C._functorch.get_interpreter_stack())


def resize_layouts(x: torch.Tensor, normalized: bool) -> tuple[bool, bool]:
    """(channels_last, nearest_channels_last) of a resize of x, from C++ (plan.h: resize_layouts,
    the operators' own rule) given x's sizes and strides: the tensors of torch.func transforms
    answer few layout queries under vmap, and a Python twin would have to match ATen's stride
    choices for size-1 dimensions, where its meta empty_like does not."""
    return _C.resize_layouts(list(x.shape), list(x.stride()), normalized)


def _dense_in(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t dense in the given layout (csrc/msfast/plan.h: dense_in), so that an operator that
    takes its nearest formulas from its input takes those of the forward it undoes. Built from
    permutes and contiguous(), which vmap batches (Tensor.contiguous(memory_format=...) it
    does not)."""
    if channels_last:
        return t if is_channels_last_contiguous(t) else t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return t if is_contiguous(t) else t.contiguous()


class _Static:
    """A Function's non-tensor arguments as one opaque value, one pytree leaf: functorch
    flattens a Function's inputs as pytrees on every call under a transform (and its generated
    vmap rules, which these Functions no longer use, matched gradients to the leaves one by one,
    where a list argument counted as its elements)."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args


class _PyramidFn(torch.autograd.Function):
    """pyramid(x, *static.args), the operator's arguments after x."""

    @staticmethod
    def forward(static, x):
        return tuple(_OPS.pyramid(x, *static.args))

    @staticmethod
    def vmap(info, in_dims, static, x):
        _, _, _, _, _, mean, std, out_dtype = static.args
        levels = _batched_pyramid(lambda f: _PyramidFn.apply(static, f), info.batch_size, in_dims[1], x, mean, std,
                                  out_dtype)
        return tuple(levels), (0,) * len(levels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        static, x = inputs
        flat, scales, mode, antialias, align_corners, mean, std, _ = static.args
        ctx.set_materialize_grads(False)  # a level the loss does not use costs nothing
        dtype = output[0].dtype
        cl, near_cl = resize_layouts(x, pyramid_normalizes(x.dtype, dtype, mean, std))
        ctx.near_cl = near_cl
        ctx.backward_args = _Static(list(x.shape), scales, mode, antialias, align_corners, std, x.dtype, cl, near_cl)
        ctx.tangent_args = _Static(flat, scales, mode, antialias, align_corners, None, std, dtype)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None
        return None, _PyramidBackwardFn.apply(ctx.backward_args, *grads)

    @staticmethod
    def jvp(ctx, _, x_t):
        return _PyramidFn.apply(ctx.tangent_args, _dense_in(x_t, ctx.near_cl))


class _PyramidBackwardFn(torch.autograd.Function):
    """pyramid_backward(grads, *static.args): the levels' gradients (None for a level without
    one) to the input's."""

    @staticmethod
    def forward(static, *grads):
        return _OPS.pyramid_backward(list(grads), *static.args)

    @staticmethod
    def vmap(info, in_dims, static, *grads):
        shape, *rest = static.args
        call = lambda gs, folded_shape: _PyramidBackwardFn.apply(_Static(folded_shape, *rest), *gs)  # noqa: E731
        return _batched_pyramid_backward(call, info.batch_size, in_dims[1:], grads, shape), 0

    @staticmethod
    def setup_context(ctx, inputs, output):
        static, *grads = inputs
        ctx.set_materialize_grads(False)
        ctx.static = static
        ctx.live = [k for k, g in enumerate(grads) if g is not None]
        ctx.hw = [v for k in ctx.live for v in grads[k].shape[2:]]
        ctx.level_dtype = grads[ctx.live[0]].dtype
        ctx.n = len(grads)

    @staticmethod
    def backward(ctx, gg):
        out = [None] * ctx.n
        if gg is not None:
            _, scales, mode, antialias, align_corners, std, _, _, near_cl = ctx.static.args
            sc = [scales[k] for k in ctx.live] if scales else None
            static = _Static(ctx.hw, sc, mode, antialias, align_corners, None, std, ctx.level_dtype)
            for k, level in zip(ctx.live, _PyramidFn.apply(static, _dense_in(gg, near_cl))):
                out[k] = level
        return (None, *out)

    @staticmethod
    def jvp(ctx, _, *grads_t):
        return _PyramidBackwardFn.apply(ctx.static, *grads_t)


class _ConcatFn(torch.autograd.Function):
    """upsample_concat(features, *static.args): size, mode, align_corners."""

    @staticmethod
    def forward(static, *features):
        return _OPS.upsample_concat(list(features), *static.args)

    @staticmethod
    def vmap(info, in_dims, static, *features):
        return _batched_concat(lambda fs: _ConcatFn.apply(static, *fs), info.batch_size, in_dims[1:], features), 0

    @staticmethod
    def setup_context(ctx, inputs, output):
        static, *features = inputs
        _, mode, align_corners = static.args
        ctx.set_materialize_grads(False)
        ctx.static = static
        ctx.shapes = [v for f in features for v in f.shape[1:]]
        ctx.near_cl = [resize_layouts(f, False)[1] for f in features]
        ctx.backward_args = _Static(ctx.shapes, mode, align_corners, resize_layouts(output, False)[0], ctx.near_cl)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * (1 + len(ctx.near_cl))
        return (None, *_ConcatBackwardFn.apply(ctx.backward_args, grad))

    @staticmethod
    def jvp(ctx, _, *tangents):
        return _ConcatFn.apply(ctx.static, *_zero_filled(tangents, ctx.shapes, ctx.near_cl))


def _zero_filled(tensors, shapes, near_cl):
    """The features' tangents or gradients, zeros where there is none (as [N, C, H, W] from
    shapes [C, H, W, ...]), each dense in the layout whose nearest formulas its feature took."""
    ref = next(t for t in tensors if t is not None)
    return [_dense_in(t if t is not None else ref.new_zeros((ref.shape[0], *shapes[3 * i: 3 * i + 3])), near_cl[i])
            for i, t in enumerate(tensors)]


class _ConcatBackwardFn(torch.autograd.Function):
    """upsample_concat_backward(grad, *static.args): the output's gradient to the features'."""

    @staticmethod
    def forward(static, grad):
        return tuple(_OPS.upsample_concat_backward(grad, *static.args))

    @staticmethod
    def vmap(info, in_dims, static, grad):
        grads = _batched_concat_backward(lambda g: _ConcatBackwardFn.apply(static, g), info.batch_size, in_dims[1],
                                         grad)
        return tuple(grads), (0,) * len(grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        static, grad = inputs
        ctx.set_materialize_grads(False)
        ctx.static = static
        ctx.size = list(grad.shape[2:])

    @staticmethod
    def backward(ctx, *ggs):
        if all(g is None for g in ggs):
            return None, None
        shapes, mode, align_corners, _, near_cl = ctx.static.args
        return None, _ConcatFn.apply(_Static(ctx.size, mode, align_corners), *_zero_filled(ggs, shapes, near_cl))

    @staticmethod
    def jvp(ctx, _, grad_t):
        return _ConcatBackwardFn.apply(ctx.static, grad_t)


def pyramid(x: torch.Tensor, a) -> list[torch.Tensor]:
    """msfast.pyramid under a transform; `a` is the checked arguments (_args.PyramidArgs)."""
    static = _Static(a.flat, a.scales, a.mode, a.antialias, a.align_corners, a.mean, a.std, a.out_dtype)
    return list(_PyramidFn.apply(static, x))


def upsample_concat(features, size, mode: str, align_corners: bool) -> torch.Tensor:
    """msfast.upsample_concat (without out=) under a transform, on checked arguments."""
    return _ConcatFn.apply(_Static(list(size), mode, align_corners), *features)


# ------------------------------------------------------------------------------ batching


def _batch_first(t: torch.Tensor, bdim, batch: int) -> torch.Tensor:
    """t with its vmapped dimension first: [B, N, C, H, W] (an unbatched t expanded)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(batch, *t.shape)


def _unfold(t: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """[B * N, ...] as [B, N, ...]: a view (splitting the first dimension always is one)."""
    return t.view(batch, n, *t.shape[1:])


# Each operator on B samples (batched along their dimension bdim, or None: the same for every
# sample) as one call on the folded batch (_C.fold: a view or a copy that each sample's
# layout and nearest formulas survive; csrc/vmap.cpp): `call` is the operator (the batching
# kernels below) or its Function (the Functions' vmap staticmethods, so that autograd records
# the folded call). They return the outputs with the batch first. Where no fold keeps a
# sample's layout, one call per sample.
def _batched_pyramid(call, B, bdim, x, mean, std, out_dtype):
    dtype = out_dtype if out_dtype is not None else (torch.float32 if x.dtype == torch.uint8 else x.dtype)
    xb = _batch_first(x, bdim, B)
    folded = _C.fold(xb, pyramid_normalizes(x.dtype, dtype, mean, std))
    if folded is None:
        per_sample = [call(xb[b]) for b in range(B)]
        return [_C.stack_samples([levels[k] for levels in per_sample]) for k in range(len(per_sample[0]))]
    return [_unfold(t, B, xb.shape[1]) for t in call(folded)]


def _batched_pyramid_backward(call, B, bdims, grads, input_shape):
    # The layouts are the operator's arguments here: any fold will do.
    folded = [None if g is None else _batch_first(g, d, B).flatten(0, 1) for g, d in zip(grads, bdims)]
    return _unfold(call(folded, [B * input_shape[0], *input_shape[1:]]), B, input_shape[0])


def _batched_concat(call, B, bdims, features):
    batched = [_batch_first(f, d, B) for f, d in zip(features, bdims)]
    folded = [_C.fold(f, False) for f in batched]
    if any(f is None for f in folded):
        return _C.stack_samples([call([f[b] for f in batched]) for b in range(B)])
    return _unfold(call(folded), B, batched[0].shape[1])


def _batched_concat_backward(call, B, bdim, grad):
    gb = _batch_first(grad, bdim, B)
    return [_unfold(g, B, gb.shape[1]) for g in call(gb.flatten(0, 1))]


# The operators' batching kernels (the FuncTorchBatched dispatch key), which torch.vmap runs
# for a call on tensors it batches. Written against functorch's own primitives, as its C++
# batching rules are: unwrap at the current level, call the operator with batching excluded
# (the levels below still run), wrap the outputs. torch.library.register_vmap's generic
# wrapper costs about 0.5 ms a call in pytree handling on this project's Xeon, ten times a
# small call's kernel. (In C++ these would need ATen/functorch's headers, which include
# nlohmann/json.hpp, which torch's wheels do not ship.)
_TF = torch._C._functorch
_NO_BATCHING = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


def _level():
    """(level, batch size) of the vmap whose batching kernel runs."""
    top = _peek()
    return top.level(), _TF.CVmapInterpreterPtr(top).batchSize()


def _pyramid_kernel(_keyset, x, sizes, *args):
    level, B = _level()
    x, bdim = _TF._unwrap_batched(x, level)
    with torch._C._ExcludeDispatchKeyGuard(_NO_BATCHING):
        if bdim is None:
            return _OPS.pyramid(x, sizes, *args)
        mean, std, out_dtype = args[-3:]
        levels = _batched_pyramid(lambda f: _OPS.pyramid(f, sizes, *args), B, bdim, x, mean, std, out_dtype)
    return [_TF._add_batch_dim(t, 0, level) for t in levels]


def _pyramid_backward_kernel(_keyset, grads, input_shape, *args):
    level, B = _level()
    unwrapped = [(None, None) if g is None else _TF._unwrap_batched(g, level) for g in grads]
    grads, bdims = [g for g, _ in unwrapped], [d for _, d in unwrapped]
    with torch._C._ExcludeDispatchKeyGuard(_NO_BATCHING):
        if all(d is None for d in bdims):
            return _OPS.pyramid_backward(grads, input_shape, *args)
        gx = _batched_pyramid_backward(lambda gs, shape: _OPS.pyramid_backward(gs, shape, *args), B, bdims,
                                       grads, input_shape)
    return _TF._add_batch_dim(gx, 0, level)


def _concat_kernel(_keyset, features, *args):
    level, B = _level()
    unwrapped = [_TF._unwrap_batched(f, level) for f in features]
    features, bdims = [f for f, _ in unwrapped], [d for _, d in unwrapped]
    with torch._C._ExcludeDispatchKeyGuard(_NO_BATCHING):
        if all(d is None for d in bdims):
            return _OPS.upsample_concat(features, *args)
        out = _batched_concat(lambda fs: _OPS.upsample_concat(fs, *args), B, bdims, features)
    return _TF._add_batch_dim(out, 0, level)


def _concat_backward_kernel(_keyset, grad, *args):
    level, B = _level()
    grad, bdim = _TF._unwrap_batched(grad, level)
    with torch._C._ExcludeDispatchKeyGuard(_NO_BATCHING):
        if bdim is None:
            return _OPS.upsample_concat_backward(grad, *args)
        grads = _batched_concat_backward(lambda g: _OPS.upsample_concat_backward(g, *args), B, bdim, grad)
    return [_TF._add_batch_dim(g, 0, level) for g in grads]


_LIB = None  # the torch.library.Library that holds the batching kernels


def install(ops, c_module) -> None:
    """Called by msfast._ops once the operators are loaded: keeps their overloads and registers
    the batching kernels. upsample_concat.out has none (out may not be batched as the features
    are): msfast.upsample_concat(out=) under vmap copies into out instead."""
    global _OPS, _C, _LIB
    _OPS, _C = ops, c_module
    _LIB = torch.library.Library("msfast", "IMPL")
    for name, kernel in [("pyramid", _pyramid_kernel), ("pyramid_backward", _pyramid_backward_kernel),
                         ("upsample_concat", _concat_kernel), ("upsample_concat_backward", _concat_backward_kernel)]:
        _LIB.impl(name, kernel, "FuncTorchBatched", with_keyset=True)
