"""torch.func transforms and forward-mode AD: the operators' batching kernels.

The operators' autograd is C++ (csrc/autograd.cpp): under torch.func's grad-like transforms
(grad, vjp, jvp, jacrev, jacfwd, hessian) and with forward-mode AD it records nodes of its
own, which functorch accepts, with forward-mode formulas. What torch.vmap needs besides is a
batching kernel per operator (the FuncTorchBatched dispatch key, registered by `install`):
it folds the vmapped dimension into N and makes one call, resized as each sample would be
alone, with the same layout and nearest formulas (msfast._C.fold, csrc/vmap.cpp), so that
vmap gives what a loop over the samples gives. Regular autograd through a vmap, and a grad
transform inside or around one, record that one call.
"""

from __future__ import annotations

import torch

from ._args import pyramid_normalizes

_OPS = None  # the operators' overloads (msfast._ops._Overloads), set by install()
_C = None  # msfast._C, set by install()
_peek = torch._C._functorch.peek_interpreter_stack


# ------------------------------------------------------------------------------ batching


def _batch_first(t: torch.Tensor, bdim, batch: int) -> torch.Tensor:
    """t with its vmapped dimension first: [B, N, C, H, W] (an unbatched t expanded)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(batch, *t.shape)


def _unfold(t: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """[B * N, ...] as [B, N, ...]: a view (splitting the first dimension always is one)."""
    return t.view(batch, n, *t.shape[1:])


# Each operator on B samples (batched along their dimension bdim, or None: the same for every
# sample) as one call of `call` (the operator) on the folded batch (_C.fold: a view or a copy
# that each sample's layout and nearest formulas survive). They return the outputs with the
# batch first. Where no fold keeps a sample's layout, one call per sample.
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
