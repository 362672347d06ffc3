"""torch.func transforms and forward-mode AD for the two operators.

The operators' autograd formulas are C++ (csrc/autograd.cpp, torch::autograd::Function: a
few microseconds a call, and a node that compiled autograd traces). functorch refuses a C++
Function under its transforms ("cannot use C++ torch::autograd::Function with functorch
transforms"), and a C++ Function has no forward-mode formula. So while a transform (vmap,
grad, vjp, jvp, jacrev, jacfwd, hessian) or forward-mode AD is active (`active`),
msfast.pyramid and msfast.upsample_concat go through the Python Functions below. Their
formulas are the C++ ones: each operator is linear in its tensors, so its backward is another
operator, the backward of a backward is the forward again, and an output's tangent is the
operator applied to the input's tangent (without the mean, which is not linear).

Batching folds the vmapped dimension into N and makes one call (the `_batched_*` helpers):
in each Function's vmap staticmethod, which applies the Function to the folded batch (so that
autograd records that one call), and in each raw operator's vmap rule
(torch.library.register_vmap, installed by `install`). A folded batch is resized as each
sample would be alone, with the same layout and nearest formulas (`_fold`): vmap gives what a
loop over the samples gives. (Explicit vmap staticmethods rather than functorch's generated
ones, which cost about 0.8 ms of Python a call on this project's Xeon; functorch's machinery
for a custom vmap still costs about 0.3 ms a call, so vmap of small inputs is slower than
vmap of F.interpolate, whose batching rules are C++.)
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch._prims_common import is_channels_last_contiguous, is_contiguous

from ._args import pyramid_normalizes

_OPS = None  # the operators' overloads (msfast._ops._Overloads), set by install()
_C = None  # msfast._C, set by install()
_peek = torch._C._functorch.peek_interpreter_stack


def active() -> bool:
    """Whether a torch.func transform or forward-mode AD is active: calls then take the Python
    Functions. Never while torch.compile traces (it traces the operators themselves)."""
    return not torch.compiler.is_compiling() and (_fwad._current_level >= 0 or _peek() is not None)


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
        levels = _batched_pyramid(lambda f: _PyramidFn.apply(static, f), info, in_dims[1], x, mean, std, out_dtype)
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
        return _batched_pyramid_backward(call, info, in_dims[1:], grads, shape), 0

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
        return _batched_concat(lambda fs: _ConcatFn.apply(static, *fs), info, in_dims[1:], features), 0

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
        grads = _batched_concat_backward(lambda g: _ConcatBackwardFn.apply(static, g), info, in_dims[1], grad)
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


def _fold(xb: torch.Tensor, normalized: bool):
    """xb [B, N, C, H, W] as one batch [B * N, C, H, W] that an operator resizes as it resizes
    each xb[b] alone: with the same resize_layouts, which decide the output's layout and the
    nearest formulas. A view where one keeps them, else a copy that does (NCHW, dense
    channels_last, or channels_last but not dense), made out of place so that a vmap nested in
    another batches it too; None where neither does (a size-1 dimension's stride can decide a
    sample's layout, and the folded batch has other sizes): the caller then loops."""
    B, N, C, H, W = xb.shape
    want = resize_layouts(xb[0], normalized) if B else None

    def view():
        return xb.view(B * N, C, H, W)

    def copy():
        channels_last, dense_channels_last = want
        if not channels_last:
            return xb.reshape(B * N, C, H, W).contiguous()
        nhwc = xb.permute(0, 1, 3, 4, 2)
        if dense_channels_last:
            return nhwc.reshape(B * N, H, W, C).permute(0, 3, 1, 2)
        # Channels_last but not dense (a channels_last batch sliced along C, say): one padding
        # channel per pixel keeps the strides' order and leaves the copy not dense.
        return F.pad(nhwc, (0, 1)).reshape(B * N, H, W, C + 1)[..., :C].permute(0, 3, 1, 2)

    for make in (view, copy):
        try:
            folded = make()
        except (RuntimeError, ValueError):  # not expressible as a view (ValueError from fake tensors)
            continue
        if not B or resize_layouts(folded, normalized) == want:
            return folded
    return None


def _unfold(t: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """[B * N, ...] as [B, N, ...]: a view (splitting the first dimension always is one)."""
    return t.view(batch, n, *t.shape[1:])


def _stack(samples):
    """Per-sample results (new dense tensors) along a new first dimension, each keeping its
    layout; out of place, for nested vmaps."""
    if is_channels_last_contiguous(samples[0]) and not is_contiguous(samples[0]):
        return torch.stack([t.permute(0, 2, 3, 1) for t in samples]).permute(0, 1, 4, 2, 3)
    return torch.stack(samples)


# Each operator on B samples (batched along their dimension bdim, or None: the same for every
# sample) as one call on the folded batch: `call` is the operator (the raw operators' vmap
# rules) or its Function (the Functions' vmap staticmethods, so that autograd records the
# folded call). They return the outputs with the batch first. Where a fold cannot keep a
# sample's layout, one call per sample.
def _batched_pyramid(call, info, bdim, x, mean, std, out_dtype):
    B = info.batch_size
    dtype = out_dtype if out_dtype is not None else (torch.float32 if x.dtype == torch.uint8 else x.dtype)
    xb = _batch_first(x, bdim, B)
    folded = _fold(xb, pyramid_normalizes(x.dtype, dtype, mean, std))
    if folded is None:
        per_sample = [call(xb[b]) for b in range(B)]
        return [_stack([levels[k] for levels in per_sample]) for k in range(len(per_sample[0]))]
    return [_unfold(t, B, xb.shape[1]) for t in call(folded)]


def _batched_pyramid_backward(call, info, bdims, grads, input_shape):
    B = info.batch_size
    folded = [None if g is None else _batch_first(g, d, B).flatten(0, 1) for g, d in zip(grads, bdims)]
    return _unfold(call(folded, [B * input_shape[0], *input_shape[1:]]), B, input_shape[0])


def _batched_concat(call, info, bdims, features):
    B = info.batch_size
    batched = [_batch_first(f, d, B) for f, d in zip(features, bdims)]
    folded = [_fold(f, False) for f in batched]
    if any(f is None for f in folded):
        return _stack([call([f[b] for f in batched]) for b in range(B)])
    return _unfold(call(folded), B, batched[0].shape[1])


def _batched_concat_backward(call, info, bdim, grad):
    B = info.batch_size
    gb = _batch_first(grad, bdim, B)
    return [_unfold(g, B, gb.shape[1]) for g in call(gb.flatten(0, 1))]


def _pyramid_vmap(info, in_dims, x, sizes, scales, mode, antialias, align_corners, mean, std, out_dtype):
    def call(folded):
        return _OPS.pyramid(folded, sizes, scales, mode, antialias, align_corners, mean, std, out_dtype)

    levels = _batched_pyramid(call, info, in_dims[0], x, mean, std, out_dtype)
    return levels, [0] * len(levels)


def _pyramid_backward_vmap(info, in_dims, grads, input_shape, *args):
    def call(folded, folded_shape):
        return _OPS.pyramid_backward(folded, folded_shape, *args)

    return _batched_pyramid_backward(call, info, in_dims[0], grads, input_shape), 0


def _concat_vmap(info, in_dims, features, size, mode, align_corners):
    return _batched_concat(lambda fs: _OPS.upsample_concat(fs, size, mode, align_corners), info, in_dims[0],
                           features), 0


def _concat_backward_vmap(info, in_dims, grad, *args):
    grads = _batched_concat_backward(lambda g: _OPS.upsample_concat_backward(g, *args), info, in_dims[0], grad)
    return grads, [0] * len(grads)


def install(ops, c_module) -> None:
    """Called by msfast._ops once the operators are loaded: keeps their overloads and registers
    the vmap rules. upsample_concat.out has none (torch.library.register_vmap takes no
    keyword-only tensor): msfast.upsample_concat(out=) under vmap copies into out instead."""
    global _OPS, _C
    _OPS, _C = ops, c_module
    for name, rule in [("pyramid", _pyramid_vmap), ("pyramid_backward", _pyramid_backward_vmap),
                       ("upsample_concat", _concat_vmap), ("upsample_concat_backward", _concat_backward_vmap)]:
        torch.library.register_vmap(f"msfast::{name}", rule)
