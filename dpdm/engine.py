"""The DP-SGD engine: per-example gradients -> flat clipping -> sum -> Gaussian noise, one entry point.

Mechanism (Abadi et al. 2016, Algorithm 1, with DPDM's noise multiplicity): for every example i of
a (Poisson-sampled) logical batch B, with its loss l_i already averaged over its own K noise draws,

    g_i  = grad_theta l_i                                   (per_sample_grads)
    g'_i = g_i * min(1, clip_norm / (||g_i||_2 (1 + 8 eps) + 1e-6))   (flat clipping, as opacus, with a margin
                                                                     of 8 ulps of the gradients' dtype)
    G    = sum_i g'_i                                       (clipped_grad_sum)
    out  = (G + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_batch_size    (add_noise)

Adding or removing one example changes G by at most clip_norm in L2 (each ||g'_i|| <= clip_norm),
which is the sensitivity the accountant assumes for add/remove neighbours (2 * clip_norm for
replace-one). The K draws of an example are averaged *inside* l_i, so the example contributes one
clipped vector whatever K is; clipping each draw and summing over the K draws would let one
example move G by K * clip_norm. The division uses the public *expected* batch size, never the
realised one (which is private under Poisson sampling). Non-finite per-example gradients are
zeroed (they contribute nothing) and counted.

Implementation: `torch.func.functional_call` + `vmap(grad_and_value(loss_one))` over the examples.
While the engine runs, a TorchFunctionMode routes F.conv2d, F.group_norm and F.silu through
autograd.Functions with hand-written vmap rules; everything else (linear layers, embeddings,
attention, the loss) uses vmap's own batching rules. The rules see the physical [B, K, ...]
tensors (B examples, K rows each) and:

  conv2d      forward and input gradient as ONE convolution over all B*K rows; per-example weight
              and bias gradients from ONE grouped convolution_backward with the examples as groups
              (rows folded into the groups where that avoids copying the activations, transposed
              next to the channels where fewer, larger groups win), or, for layers with one to four
              input or output channels (a U-Net's first and last convs), one batched matmul per
              kernel tap on zero-padded flat views (no im2col, no copies of the activations).
  group_norm  forward over all rows; backward as ONE fused kernel that treats the B*K rows as a
              single row of B*K*C channels in B*K*G groups (the same groups), so that its affine
              gradients are per row; they are summed over each example's K rows.
  silu        the fused backward kernel (torch.func's grad differentiates with create_graph=True,
              under which silu's backward is a chain of elementwise ops, each batched by vmap).

Plain vmap(grad) computes the same numbers (tested to 1e-10) but copies every activation and
output gradient into a [K, B*C] layout for its grouped weight-gradient convolutions and runs the
decomposed backward formulas. Static arguments reach the Functions as one opaque leaf (`_Static`):
torch.func flattens a Function's arguments with pytree on every call. No state is attached to
modules or tensors: the mode exists only for the duration of the call.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.overrides import TorchFunctionMode

from dpdm.noise_scale import MAX_NOISE_STD, MIN_CLIP_NORM, noise_scale_problem  # noqa: F401  (re-exported)

__all__ = [
    "per_sample_grads",
    "clipped_grad_sum",
    "add_noise",
    "noise_generator",
    "private_grad",
    "validate_model",
    "public_subspace",
    "SubspaceSpanError",
    "add_noise_in_subspace",
]



class SubspaceSpanError(ValueError):
    """The public gradients span fewer directions than the subspace asked for (the caller's settings)."""


_aten = torch.ops.aten
_CLIP_EPS = 1e-6   # opacus: min(1, C / (norm + 1e-6))
# And a relative margin: the scaled gradient g * factor is rounded in the parameters' dtype, which can make its
# norm exceed C by a few units in the last place (1.4e-7 relative in float32, measured): 8 ulps keep it below.
_CLIP_ULPS = 8


def _clip_factors(norms: torch.Tensor, clip_norm: float, dtype: torch.dtype) -> torch.Tensor:
    """min(1, C / (||g|| (1 + 8 eps) + 1e-6)) per example, for float64 `norms` of gradients held in `dtype`: the
    gradient scaled by it and rounded in `dtype` has a norm of at most C."""
    margin = 1 + _CLIP_ULPS * torch.finfo(dtype).eps
    return (clip_norm / (norms * margin + _CLIP_EPS)).clamp(max=1.0)


def _usable(norms: torch.Tensor, factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The examples whose gradient can be clipped in `dtype`: a finite norm whose clip factor (`_clip_factors`) is a
    normal number of `dtype` (a float32 gradient of norm 1e44, finite in float64, took a subnormal factor and came
    out at 1.0002 C). The others are zeroed, as non-finite gradients are."""
    return torch.isfinite(norms) & (factors >= torch.finfo(dtype).tiny)


def _norms64(rows: torch.Tensor, max_elements: int = 2**22) -> torch.Tensor:
    """The L2 norm of each row of `rows` [n, d], summed in float64 (a float32 sum of a large gradient's squares
    came out 1.3e-6 relative low, and the example was clipped to 1.0000012 C), a block of rows at a time."""
    if rows.shape[0] == 0:
        return rows.new_zeros(0, dtype=torch.float64)
    step = max(1, max_elements // max(rows.shape[1], 1))
    return torch.cat([torch.linalg.vector_norm(rows[i:i + step], dim=1, dtype=torch.float64)
                      for i in range(0, rows.shape[0], step)])

# ----------------------------------------------------------------------------------------------
# Validation


def validate_model(model: nn.Module) -> None:
    """Rejects modules that mix the examples of a batch (they break per-example gradients and DP).

    Raises:
        ValueError: naming the first offending module (BatchNorm*, SyncBatchNorm, InstanceNorm with
            running statistics, dropout in training mode, an Embedding with max_norm, which renormalises
            its weight in place by the batch, or with sparse=True) and the fix.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} must be a torch.nn.Module")
    for name, m in model.named_modules():
        label = f"{name or '<root>'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"model contains {label}, which normalizes with statistics of the whole batch and so "
                "mixes examples: per-example gradients (and the DP guarantee) need layers that treat each "
                "example on its own; replace it with nn.GroupNorm")
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise ValueError(
                f"model contains {label} with track_running_stats=True, whose running statistics mix "
                "examples; use nn.GroupNorm (or track_running_stats=False)")
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ValueError(
                f"model contains {label} with max_norm={m.max_norm:g}, which renormalises the rows a batch looks up in "
                "place, changing the weights by the private examples outside the DP mechanism; use max_norm=None")
        if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad:   # a frozen one has none (r1 F1)
            raise ValueError(f"model contains {label} with sparse=True, whose sparse gradients the per-example "
                             "gradients cannot batch; use sparse=False (each example's gradient is dense anyway)")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"model contains {label} with p={m.p:g} in training mode: the vectorized per-example gradients "
                "cannot draw its random masks; set p=0 or call .eval() on it")


_CLIP_DTYPES = (torch.float32, torch.float64)


def _check_trainable(model: nn.Module, *, clipping: bool) -> None:
    """Raises ValueError if `model` has no trainable parameter or, with `clipping`, one that is not
    float32/float64: in bfloat16 or float16 the norm, the clip factor and the sum round so coarsely
    that a clipped gradient can exceed clip_norm (by ~0.5% in bfloat16), breaking the sensitivity
    bound the accountant assumes, and float16 norms overflow past 65504."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameter with requires_grad=True: there is nothing to differentiate")
    if clipping:
        for name, p in trainable:
            if p.dtype not in _CLIP_DTYPES:
                raise ValueError(
                    f"parameter {name!r} is {p.dtype}: DP clipping needs float32 or float64 trainable parameters "
                    "(in lower precision a clipped gradient can exceed clip_norm); cast the model with .float()")


def _check_batch(batch: Sequence[Any]) -> int:
    if not batch:
        raise ValueError("batch=() must hold at least one tensor (the examples)")
    for i, t in enumerate(batch):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"batch[{i}]={type(t).__name__} must be a torch.Tensor")
        if t.dim() == 0:
            raise ValueError(f"batch[{i}] has shape () but must have a leading batch dimension")
    sizes = [t.shape[0] for t in batch]
    if len(set(sizes)) != 1:
        raise ValueError(f"batch tensors have leading sizes {sizes}; they must all equal the number of examples")
    return int(sizes[0])


def _is_number(v) -> bool:
    """A real number that is not a bool: Python's int and float, and numpy's integer and float scalars (the callers
    convert it with float())."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _check_positive(**kw: float) -> None:
    for name, v in kw.items():
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a finite number > 0")


def _check_noise_multiplier(noise_multiplier: float) -> None:
    if not _is_number(noise_multiplier) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")


def _check_clip_norm(clip_norm: float, noise_multiplier: float | None = None) -> None:
    """A clip norm > 0 that float32 training can represent, as `dpdm train` requires (`noise_scale_problem`):
    not below MIN_CLIP_NORM, where clipped gradients round in float32's subnormals past the clip bound (stop 50:
    1.14 C at C = 1.57e-43), and, where noise is added (`noise_multiplier` given), no noise std or clip norm above
    MAX_NOISE_STD. Without noise a huge clip norm only clips nothing."""
    _check_positive(clip_norm=clip_norm)
    if noise_multiplier is None and clip_norm >= MIN_CLIP_NORM:
        return
    problem = noise_scale_problem(noise_multiplier or 0.0, clip_norm)
    if problem:
        raise ValueError(problem)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be None or an integer >= 1")


# ----------------------------------------------------------------------------------------------
# Per-layer rules
#
# Pattern: a differentiable Function (`_GroupNorm`, `_Silu`) whose forward is the usual op (its
# vmap rule folds the example dimension into the rows) and whose backward uses fused kernels;
# `_GroupNorm`'s backward calls `_GroupNormGrad`, which carries its own `vmap` staticmethod: under
# vmap(grad(...)) it receives the physical tensors with the example dimension and computes the
# input gradient over all rows at once and the affine gradients per example. The gradient
# Function is never differentiated (no double backward through the engine).


class _Static:
    """Static (non-tensor) arguments of a rule, passed to Function.apply as ONE opaque leaf.

    autograd.Function under torch.func flattens its arguments with pytree on every call; nested
    tuples and lists of ints (strides, paddings, masks) cost more there than the kernels of the
    small layers they describe.
    """

    __slots__ = ("v",)

    def __init__(self, *v) -> None:
        self.v = v


def _batch_first(t: torch.Tensor, bdim: int | None, size: int) -> torch.Tensor:
    """Physical tensor with the vmapped dimension first (expanded if the tensor is not batched)."""
    if bdim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _loop_rule(fn: Callable, info, in_dims, args) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """Generic (slow) vmap rule: one call per vmapped element, results stacked."""
    outs = []
    for i in range(info.batch_size):
        outs.append(fn(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]))
    stacked = tuple(torch.stack(o) for o in zip(*outs))
    return stacked, (0,) * len(stacked)


class _GradRule(torch.autograd.Function):
    """Base of the gradient Functions: computed under the engine's vmap, never differentiated."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise ValueError("dpdm.engine's per-layer rules do not support double backward (a loss_fn that differentiates "
                         "through the model, such as an input-gradient penalty): pass per_layer_rules=False (plain "
                         "vmap, the same numbers; dpdm train: --grad-engine vmap)")


_GROUP_NORM_MAX_GROUPS = 65_535   # CUDA's limit on a grid's y dimension (native_group_norm_backward's groups)


class _GroupNormGrad(_GradRule):
    """Selected (grad_input, grad_weight, grad_bias) of native_group_norm, as a tuple."""

    @staticmethod
    def forward(go, x, mean, rstd, w, conf):
        G, mask = conf.v
        N, C = x.shape[:2]
        out = _aten.native_group_norm_backward(go, x, mean, rstd, w, N, C, x[0, 0].numel(), G, list(mask))
        return tuple(o for o, m in zip(out, mask) if m)

    @staticmethod
    def vmap(info, in_dims, go, x, mean, rstd, w, conf):
        if w is not None and in_dims[4] is not None:
            return _loop_rule(lambda *a: _GroupNormGrad.apply(*a, conf), info, in_dims[:5], (go, x, mean, rstd, w))
        G, mask = conf.v
        B = info.batch_size
        go, x = _batch_first(go, in_dims[0], B).contiguous(), _batch_first(x, in_dims[1], B).contiguous()
        mean, rstd = _batch_first(mean, in_dims[2], B), _batch_first(rstd, in_dims[3], B)   # [B, K, G]
        n, C = x.shape[1:3]
        hw = x[0, 0, 0].numel()
        # All b*n rows of b examples as ONE row of b*n*C channels in b*n*G groups (the same groups,
        # in order): one fused kernel gives the input gradient and, with the weight repeated per row,
        # the affine gradients of every row, which are then summed over each example's n rows.
        # CUDA launches that kernel with the group count as a grid dimension (at most 65,535), so the
        # examples go in slices of at most that many groups.
        mask_rows = [mask[0], mask[1] and w is not None, mask[2]]
        if n * G > _GROUP_NORM_MAX_GROUPS:
            # One example alone is over the limit (K >= 2048 at 32 groups): its n rows go as the kernel's batch
            # of n rows in G groups, a grid of (n, G), and the kernel sums the affine gradients over those rows.
            gxs, gws, gbs = [], [], []
            for s in range(B):
                gx, gw, gb = _aten.native_group_norm_backward(
                    go[s].reshape(n, C, hw), x[s].reshape(n, C, hw), mean[s].reshape(n, G),
                    rstd[s].reshape(n, G), w, n, C, hw, G, mask_rows)
                if mask[0]:
                    gxs.append(gx.view(x.shape[1:]))
                if mask[1]:
                    gws.append(gw)
                if mask[2]:
                    gbs.append(gb)
            outs = tuple(torch.stack(parts) for parts in (gxs, gws, gbs) if parts)
            return outs, (0,) * len(outs)
        step = min(B, max(1, _GROUP_NORM_MAX_GROUPS // (n * G)))
        w_rows = None if w is None else w.repeat(step * n)   # the last slice takes its first b*n*C
        gxs, gws, gbs = [], [], []
        for s in range(0, B, step):
            b = min(step, B - s)
            gx, gw, gb = _aten.native_group_norm_backward(
                go[s:s + b].reshape(1, b * n * C, hw), x[s:s + b].reshape(1, b * n * C, hw),
                mean[s:s + b].reshape(1, -1), rstd[s:s + b].reshape(1, -1),
                None if w_rows is None else w_rows[:b * n * C], 1, b * n * C, hw, b * n * G, mask_rows)
            if mask[0]:
                gxs.append(gx.view(b, *x.shape[1:]))
            if mask[1]:
                gws.append(gw.view(b, n, C).sum(1))
            if mask[2]:
                gbs.append(gb.view(b, n, C).sum(1))
        outs = tuple(parts[0] if len(parts) == 1 else torch.cat(parts) for parts in (gxs, gws, gbs) if parts)
        return outs, (0,) * len(outs)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b, G, eps):
        N, C = x.shape[:2]
        return _aten.native_group_norm(x, w, b, N, C, x[0, 0].numel(), G, eps)

    @staticmethod
    def vmap(info, in_dims, x, w, b, G, eps):
        if in_dims[1] is not None or in_dims[2] is not None:
            return _loop_rule(lambda *a: _GroupNorm.apply(*a, G, eps), info, in_dims[:3], (x, w, b))
        x = _batch_first(x, in_dims[0], info.batch_size).contiguous()   # [B, K, C, ...]
        B, n, C = x.shape[:3]
        y, mean, rstd = _aten.native_group_norm(x.flatten(0, 1), w, b, B * n, C, x[0, 0, 0].numel(), G, eps)
        return (y.unflatten(0, (B, n)), mean.unflatten(0, (B, n)), rstd.unflatten(0, (B, n))), (0, 0, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, G, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, w)
        ctx.G = G
        ctx.has_weight, ctx.has_bias = w is not None, b is not None

    @staticmethod
    def backward(ctx, go, _gmean, _grstd):
        x, mean, rstd, w = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.has_weight and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2])
        grads = iter(_GroupNormGrad.apply(go, x, mean, rstd, w, _Static(ctx.G, mask)) if any(mask) else ())
        out = [next(grads) if m else None for m in mask]
        return out[0], out[1], out[2], None, None


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    if input.dim() < 2 or input.shape[0] == 0:
        return F.group_norm(input, num_groups, weight, bias, eps)
    return _GroupNorm.apply(input.contiguous(), weight, bias, int(num_groups), float(eps))[0]


class _Silu(torch.autograd.Function):
    """SiLU whose backward is the fused kernel (torch.func's create_graph backward decomposes it)."""

    @staticmethod
    def forward(x):
        return F.silu(x)

    @staticmethod
    def vmap(info, in_dims, x):
        return _Silu.apply(x), in_dims[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, go):
        (x,) = ctx.saved_tensors
        return _aten.silu_backward(go, x)


def _silu(input, inplace=False):
    if inplace:
        return F.silu(input, inplace=True)
    return _Silu.apply(input)


def _conv2d_param_grads_taps(go: torch.Tensor, x: torch.Tensor, w: torch.Tensor, padding, bias: bool):
    """Per-example gradients of a stride-1, ungrouped conv2d as one batched matmul per kernel tap.

    With x zero-padded to width Wp = W + 2p (and one extra row) and go zero-padded to width Wp,
    every tap (kh, kw) sees x as ONE strided [I, H_out*Wp] window starting at kh*Wp + kw: the
    padding columns of go are zero, so they add nothing. No im2col; x and go are read once per tap.
    Wins where the layer has very few input or output channels (a U-Net's first and last convs),
    where grouped convolutions with one channel per group are slow.
    """
    B, n, I, H, W = x.shape
    O, _, kh_, kw_ = w.shape
    ph, pw = padding
    Wp = W + 2 * pw
    Ho, Wo = go.shape[-2:]
    L = Ho * Wp
    xp = F.pad(x.reshape(B * n, I, H, W), (pw, pw, ph, ph + 1)).view(B * n, I, -1)      # [Bn, I, (H+2p+1)*Wp]
    gp = F.pad(go.reshape(B * n, O, Ho, Wo), (0, Wp - Wo)).view(B * n, O, L)          # [Bn, O, L]
    out = x.new_empty((kh_, kw_, B * n, O, I))
    for i in range(kh_):
        for j in range(kw_):
            off = i * Wp + j
            torch.bmm(gp, xp[:, :, off:off + L].transpose(1, 2), out=out[i, j])
    gw = out.view(kh_, kw_, B, n, O, I).sum(3).permute(2, 3, 4, 0, 1).contiguous()    # [B, O, I, kh, kw]
    gb = go.reshape(B, n, O, -1).sum(-1).sum(1) if bias else None
    return gw, gb


def _conv_param_grads(go: torch.Tensor, x: torch.Tensor, w: torch.Tensor, conf, bias: bool):
    """Per-example conv (weight, bias) gradients ([B, *w.shape], [B, O] or None) from physical
    go [B, n, O, ...] and x [B, n, I, ...], both batch-first and contiguous.

    One grouped convolution_backward with the examples as groups, which also returns the bias
    gradients. Where an example has one row (n = 1), [1, B*I, ...] is a free view of the
    batch-first tensors; otherwise the rows of an example are either folded into the groups too
    (groups B*n, then a sum over n: no copy of the activations) or become the convolution's batch
    (examples next to channels: one copy of x and go, fewer and larger groups).
    """
    stride, padding, dilation, groups = conf
    B, n = x.shape[:2]
    spatial = x.shape[3:]
    O = w.shape[0]
    zeros = [0] * len(spatial)
    if min(O, x.shape[2]) <= 4 and groups == 1 and len(spatial) == 2 and set(stride) == {1} and set(dilation) == {1}:
        return _conv2d_param_grads_taps(go, x, w, padding, bias)
    # Measured on a 2-core CPU (mkldnn), mnist U-Net shapes, K = 4: folding wins for 1x1 kernels
    # and at 28x28; the transposed layout wins for 3x3 kernels at 14x14 and below.
    fold = n == 1 or w[0, 0].numel() == 1 or math.prod(spatial) >= 784
    G = B * n if fold else B                       # groups of the grouped convolution, per layer group
    if fold:
        xg = x.reshape(1, B * n * x.shape[2], *spatial)
        gg = go.reshape(1, B * n * O, *go.shape[3:])
    else:
        xg = x.transpose(0, 1).reshape(n, B * x.shape[2], *spatial)           # copy
        gg = go.transpose(0, 1).reshape(n, B * O, *go.shape[3:])              # copy
    # The weight only gives its shape to the weight gradient: an uninitialised one does.
    wd = w.new_empty((G * O, *w.shape[1:]))
    _, gw, gb = _aten.convolution_backward(gg, xg, wd, [G * O] if bias else None, stride, padding, dilation, False,
                                           zeros, groups * G, [False, True, bias])
    if G == B:   # one group per example already
        return gw.view(B, *w.shape), (gb.view(B, O) if bias else None)
    return gw.view(B, G // B, *w.shape).sum(1), (gb.view(B, G // B, O).sum(1) if bias else None)


class _ConvGrad(_GradRule):
    """Selected (grad_input, grad_weight, grad_bias) of a convolution, as a tuple."""

    @staticmethod
    def forward(go, x, w, conf):
        stride, padding, dilation, groups, mask = conf.v
        out = _aten.convolution_backward(go, x, w, [w.shape[0]] if mask[2] else None, stride, padding, dilation,
                                         False, [0] * len(stride), groups, list(mask))
        return tuple(o for o, m in zip(out, mask) if m)

    @staticmethod
    def vmap(info, in_dims, go, x, w, conf):
        if in_dims[2] is not None:
            return _loop_rule(lambda *a: _ConvGrad.apply(*a, conf), info, in_dims[:3], (go, x, w))
        stride, padding, dilation, groups, mask = conf.v
        B = info.batch_size
        go = _batch_first(go, in_dims[0], B).contiguous()                      # [B, n, O, ...]
        x = _batch_first(x, in_dims[1], B).contiguous()                        # [B, n, I, ...]
        n = x.shape[1]
        outs = []
        if mask[0]:   # input gradient over all B*n rows at once
            gx = _aten.convolution_backward(go.flatten(0, 1), x.flatten(0, 1), w, None, stride, padding, dilation,
                                            False, [0] * len(stride), groups, [True, False, False])[0]
            outs.append(gx.unflatten(0, (B, n)))
        if mask[1] or mask[2]:
            gw, gb = _conv_param_grads(go, x, w, (stride, padding, dilation, groups), mask[2])
            outs += [g for g, m in ((gw, mask[1]), (gb, mask[2])) if m]
        return tuple(outs), (0,) * len(outs)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b, conf):
        stride, padding, dilation, groups = conf.v
        return _aten.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def vmap(info, in_dims, x, w, b, conf):
        if in_dims[1] is not None or in_dims[2] is not None:   # a weight or bias that depends on the example
            outs, dims = _loop_rule(lambda *a: (_Conv.apply(*a, conf),), info, in_dims[:3], (x, w, b))
            return outs[0], dims[0]   # the Function's one output, not a tuple of it
        x = _batch_first(x, in_dims[0], info.batch_size).contiguous()         # [B, n, C, ...]
        B, n = x.shape[:2]
        y = _Conv.forward(x.flatten(0, 1), w, b, conf)
        return y.unflatten(0, (B, n)), 0

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, conf = inputs
        ctx.save_for_backward(x, w)
        ctx.conf = conf
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        grads = iter(_ConvGrad.apply(go, x, w, _Static(*ctx.conf.v, mask)) if any(mask) else ())
        out = [next(grads) if m else None for m in mask]
        return out[0], out[1], out[2], None


def _tuple(v, d: int) -> list[int]:
    """`d` ints from an int or a sequence, as torch's conv2d reads them: a 1-tuple such as (1,) stands for (1, 1)."""
    v = [int(a) for a in v] if isinstance(v, (tuple, list)) else [int(v)]
    return v * d if len(v) == 1 else v


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str) or input.dim() != 4 or input.shape[0] == 0:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    conf = _Static(_tuple(stride, 2), _tuple(padding, 2), _tuple(dilation, 2), int(groups))
    return _Conv.apply(input, weight, bias, conf)   # the vmap rule makes the physical tensor contiguous


class _PerLayerRules(TorchFunctionMode):
    """Routes group_norm / silu through the engine's Functions while the engine runs."""

    _RULES = {F.group_norm: _group_norm, F.silu: _silu, F.conv2d: _conv2d}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = self._RULES.get(func)
        if rule is not None:
            return rule(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------
# Per-example gradients


class _BoundLoss(nn.Module):
    """loss_fn(model, *example) as a module, so functional_call can swap in the parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *example):
        return self.loss_fn(self.model, *example)


def _per_example(
    model: nn.Module,
    loss_fn: Callable,
    batch: Sequence[torch.Tensor],
    chunk_size: int | None,
    *,
    rules: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(name -> per-example gradients [n, *shape], per-example losses [n]) for a non-empty batch.

    rules=False runs plain vmap(grad) (the reference the per-layer rules are tested against).
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    # The gradients are the parameters' alone: a batch tensor with requires_grad=True left an autograd graph back to
    # it on them, and the conv rule's per-tap matmuls (out=) refused it outright (h154 N5, stop 55).
    batch = [t.detach() for t in batch]
    bound = _BoundLoss(model, loss_fn)

    def loss_one(params: dict[str, torch.Tensor], *example: torch.Tensor) -> torch.Tensor:
        example = tuple(t.unsqueeze(0) for t in example)   # ONE example, leading dim 1
        loss = functional_call(bound, {f"model.{k}": v for k, v in params.items()}, example)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn returned {shape}; it must return a scalar (0-dim) tensor for one example")
        return loss

    fn = vmap(grad_and_value(loss_one), in_dims=(None,) + (0,) * len(batch), chunk_size=chunk_size,
              randomness="error")
    try:
        if rules:
            with _PerLayerRules():
                grads, losses = fn(params, *batch)
        else:
            grads, losses = fn(params, *batch)
    except NotImplementedError as e:
        if "Sparse" not in str(e):
            raise
        raise ValueError("the model or loss_fn makes a sparse tensor (an embedding with sparse=True, say), which the "
                         "per-example gradients cannot batch: use sparse=False") from e
    except RuntimeError as e:
        if "embedding_renorm_" in str(e):   # torch's message names a vmap batching rule, not the caller's setting
            raise ValueError(
                "the model or loss_fn calls an embedding with max_norm, which renormalises the rows a batch looks up "
                "in place, changing the weights by the private examples outside the DP mechanism: use max_norm=None"
            ) from e
        if "randomness error mode" in str(e):   # torch's names vmap's flags, which the caller cannot set
            raise ValueError(
                "the model or loss_fn draws random numbers (torch.randn_like, dropout in training mode, ...) per "
                "example: draw them outside, from a generator, and pass them in as batch tensors (one row per example, "
                "as EDMLoss.draw's sigma and noise are), or switch the randomness off (model.eval())") from e
        if "mutate a captured Tensor" not in str(e):
            raise
        # validate_model names the known cross-example layers; a custom one shows itself only here, as torch.func's
        # refusal of an in-place update (a running statistic, a counter) that names no module.
        holders = sorted({name.rpartition(".")[0] or "<root>" for name, _ in model.named_buffers()})
        where = (f"; the modules holding buffers: {', '.join(holders[:5])}{' ...' if len(holders) > 5 else ''}"
                 if holders else "")
        raise ValueError(
            "the model's forward updates a tensor it holds in place (a running statistic, say), which mixes the "
            "examples of a batch: per-example gradients (and the DP guarantee) need a forward that treats each "
            f"example on its own{where}") from e
    return {name: g.detach() for name, g in grads.items()}, losses.detach()   # nor one from a tensor loss_fn captures


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable,
    *batch: torch.Tensor,
    chunk_size: int | None = None,
    per_layer_rules: bool = True,
) -> dict[str, torch.Tensor]:
    """Gradient of each example's loss with respect to every trainable parameter.

    Args:
        model: an nn.Module without cross-example layers (see `validate_model`).
        loss_fn: `loss_fn(model, *example)` -> scalar loss of ONE example; gets the module (callable
            as usual) and that example's tensors, each with a leading dim of 1. Randomness (noise
            draws, label drops) should be drawn outside and passed in as batch tensors.
        *batch: tensors with the examples along dim 0 (any dtypes; integer labels allowed).
        chunk_size: examples computed at once by vmap (memory knob; the same result up to float rounding).
        per_layer_rules: True (default): conv2d, group_norm and silu go through the engine's
            hand-written vmap rules; False: plain vmap(grad). The same numbers (to rounding); the rules
            use less memory and time at CPU sizes, but cost Python time per chunk (speed knob).

    Returns:
        {parameter name: tensor [n, *parameter.shape]} for the parameters with requires_grad.
    """
    validate_model(model)
    _check_trainable(model, clipping=False)
    _check_chunk_size(chunk_size)
    n = _check_batch(batch)
    if n == 0:
        return {name: p.detach().new_zeros((0, *p.shape)) for name, p in model.named_parameters() if p.requires_grad}
    grads, _ = _per_example(model, loss_fn, batch, chunk_size, rules=per_layer_rules)
    return grads


# ----------------------------------------------------------------------------------------------
# Clipping, summing, noising


def _clip_and_sum(
    grads: dict[str, torch.Tensor], clip_norm: float, total: dict[str, torch.Tensor]
) -> tuple[int, int]:
    """Adds sum_i g_i * min(1, C / (||g_i|| (1 + 8 eps) + 1e-6)) to `total`, zeroing non-finite g_i.

    Returns (number of clipped examples, number of non-finite examples).
    """
    first = next(iter(grads.values()))
    n = first.shape[0]
    sq = torch.zeros(n, dtype=torch.float64, device=first.device)
    for g in grads.values():
        sq += _norms64(g.reshape(n, -1)) ** 2
    norms = sq.sqrt()                                                      # [n] flat L2 norms
    # The margin and the smallest usable factor of the coarsest dtype among the parameters (float64 ones
    # first, then float32 ones: float64's margin let the float32 rows round to 5e-8 above C).
    coarse = max((g.dtype for g in grads.values()), key=lambda d: torch.finfo(d).eps)
    factor = _clip_factors(norms, clip_norm, coarse)
    finite = _usable(norms, factor, coarse)
    factor = torch.where(finite, factor, torch.zeros_like(norms))
    nonfinite = int((~finite).sum())
    clipped = int((finite & (norms > clip_norm)).sum())
    for name, g in grads.items():
        if nonfinite:   # 0 * nan = nan: drop those rows explicitly (jax_privacy's _maybe_zero)
            g = torch.where(finite.reshape(-1, *([1] * (g.dim() - 1))), g, torch.zeros((), dtype=g.dtype, device=g.device))
        total[name] += torch.tensordot(factor.to(g.dtype), g, dims=1)    # sum_i factor_i g_i
    return clipped, nonfinite


def clipped_grad_sum(
    model: nn.Module,
    loss_fn: Callable,
    *batch: torch.Tensor,
    clip_norm: float,
    chunk_size: int | None = None,
    stats: dict | None = None,
    per_layer_rules: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum over the examples of the flat-clipped per-example gradients (no noise, not divided).

    The batch is processed in physical chunks of `chunk_size` examples whose clipped sums
    accumulate (memory ~ chunk_size per-example gradients); the result is the same up to float rounding
    (the sum's order changes), so runs that differ only in it are not bitwise identical.

    Args:
        clip_norm: C > 0; each example's whole gradient is scaled by min(1, C / (||g_i|| (1 + 8 eps) + 1e-6)).
            Below MIN_CLIP_NORM (1e-30) it is refused: float32 cannot hold gradients clipped to it.
        stats: if a dict, filled with batch_size, nonfinite (examples zeroed), clipped_fraction,
            loss_mean (mean of the finite per-example losses; nan if there are none) and loss_count
            (how many were finite). These are NOT private.
        per_layer_rules: as in `per_sample_grads` (privacy-neutral speed knob).

    Returns:
        {parameter name: tensor of the parameter's shape}. An empty batch gives zeros.
    """
    validate_model(model)
    _check_trainable(model, clipping=True)
    _check_clip_norm(clip_norm)
    _check_chunk_size(chunk_size)
    clip_norm = float(clip_norm)
    n = _check_batch(batch)
    total = {name: torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
             for name, p in model.named_parameters() if p.requires_grad}
    clipped = nonfinite = loss_count = 0
    loss_sum = 0.0
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, max(step, 1)):
        part = [t[start:start + step] for t in batch]
        grads, losses = _per_example(model, loss_fn, part, None, rules=per_layer_rules)
        c, nf = _clip_and_sum(grads, clip_norm, total)
        del grads
        clipped += c
        nonfinite += nf
        losses = losses.double()
        losses = losses[torch.isfinite(losses)]
        loss_sum += float(losses.sum())
        loss_count += int(losses.numel())
    if stats is not None:
        stats.update(
            batch_size=n,
            nonfinite=nonfinite,
            clipped_fraction=clipped / n if n else 0.0,
            loss_mean=loss_sum / loss_count if loss_count else float("nan"),
            loss_count=loss_count,
        )
    return total


NoiseGenerator = torch.Generator | np.random.Generator


def noise_generator(seed: int, device: str | torch.device = "cpu") -> NoiseGenerator:
    """A generator for DP noise that keeps all 64 bits of `seed` (an integer in [0, 2**64)).

    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed: one step's noise would
    then be one of 2**32 vectors, few enough to search for an adversary who sees a noisy update and
    knows the other examples. On the CPU this is therefore numpy's PCG64 seeded through a
    SeedSequence; on CUDA, torch's Philox generator, whose seed is a full 64-bit integer.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**64)")
    seed = int(seed)   # numpy's integers too
    device = torch.device(device)
    if device.type == "cuda":
        return torch.Generator(device=device).manual_seed(seed)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))


def _standard_normal(like: torch.Tensor, generator: NoiseGenerator) -> torch.Tensor:
    if isinstance(generator, np.random.Generator):
        dtype = np.float64 if like.dtype == torch.float64 else np.float32
        z = torch.from_numpy(generator.standard_normal(like.numel(), dtype=dtype)).reshape(like.shape)
        return z.to(device=like.device, dtype=like.dtype)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def add_noise(
    grad_sum: dict[str, torch.Tensor],
    *,
    noise_multiplier: float,
    clip_norm: float,
    expected_batch_size: float,
    generator: NoiseGenerator | None = None,
) -> dict[str, torch.Tensor]:
    """(grad_sum + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_batch_size.

    The Gaussian mechanism on a sum of sensitivity clip_norm (add/remove one example). Noise is
    drawn once per parameter tensor, in the dict's order, from `generator`: a torch or numpy
    generator (see `noise_generator`: seed a torch CPU generator and only 32 bits of its seed
    count). None, the default, is a fresh generator with a secret 64-bit seed (`secrets`), never
    torch's global generator: a notebook's `torch.manual_seed(0)` would let anyone who reads it replay
    the noise and subtract it. Pass a generator only to reproduce the noise (tests), and keep its seed
    secret otherwise. Divide by the public expected batch size, never by the realised one. A clip norm
    or noise std that float32 cannot represent (`noise_scale_problem`) is refused.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_clip_norm(clip_norm, noise_multiplier)
    _check_positive(expected_batch_size=expected_batch_size)
    noise_multiplier, clip_norm = float(noise_multiplier), float(clip_norm)   # numpy's scalars too
    expected_batch_size = float(expected_batch_size)
    if generator is not None and not isinstance(generator, (torch.Generator, np.random.Generator)):
        raise ValueError(f"generator={type(generator).__name__} must be None, a torch.Generator or a "
                         "numpy.random.Generator (see noise_generator)")
    noise_std = noise_multiplier * clip_norm
    if generator is None and noise_std > 0 and grad_sum:
        generator = noise_generator(secrets.randbits(64), next(iter(grad_sum.values())).device)
    out = {}
    for name, g in grad_sum.items():
        if noise_std > 0:
            g = g + noise_std * _standard_normal(g, generator)
        out[name] = g / expected_batch_size
    return out


def private_grad(
    model: nn.Module,
    loss_fn: Callable,
    *batch: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: NoiseGenerator | None = None,
    chunk_size: int | None = None,
    stats: dict | None = None,
    per_layer_rules: bool = True,
) -> dict[str, torch.Tensor]:
    """One DP-SGD gradient: clip each example's flat gradient to clip_norm, sum, add
    N(0, (noise_multiplier * clip_norm)^2) once, divide by expected_batch_size.

    An empty batch yields pure noise / expected_batch_size. Equals
    `add_noise(clipped_grad_sum(...), ...)`; see those for the arguments. `generator=None` draws the
    noise from a fresh generator with a secret seed (never torch's global generator; see `add_noise`).

    This is one step of the mechanism, and nothing more: it does no accounting and cannot check that
    its caller keeps to a plan. A loop of its own that claims a plan's epsilon must (as `dpdm.train.train`
    does): draw each batch by Poisson sampling at `plan.sample_rate` (`dpdm.data.PoissonSampler`) from a
    secret seed; pass `expected_batch_size=plan.batch_size`, never the realised batch's size; pass
    `noise_multiplier=plan.noise_multiplier` and `clip_norm=plan.clip_norm` (0 noise is no privacy);
    average each example's K noise draws inside `loss_fn` (one example per batch row, as
    `dpdm.loss.engine_loss_fn`), never pass the draws as examples of their own; and call it at most
    `plan.steps` times. `audits.mechanism.check_engine` and `check_sampler` test a loop's own pieces.
    """
    # Check the noise arguments before spending the compute.
    _check_noise_multiplier(noise_multiplier)
    _check_clip_norm(clip_norm, noise_multiplier)
    _check_positive(expected_batch_size=expected_batch_size)
    noise_multiplier, clip_norm = float(noise_multiplier), float(clip_norm)   # numpy's scalars too
    expected_batch_size = float(expected_batch_size)
    grad_sum = clipped_grad_sum(model, loss_fn, *batch, clip_norm=clip_norm, chunk_size=chunk_size, stats=stats,
                                per_layer_rules=per_layer_rules)
    return add_noise(grad_sum, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                     expected_batch_size=expected_batch_size, generator=generator)


# ----------------------------------------------------------------------------------------------
# Noise in a public gradient subspace (Zhou et al. 2021, "Bypassing the ambient dimension"; Yu et
# al. 2021, GEP; Kairouz et al. 2021): the clipped sum is projected onto k orthonormal directions
# estimated from PUBLIC examples, the noise is added there, and the result is mapped back. The
# projection has spectral norm <= 1, so the projected sum still moves by at most clip_norm when one
# example is added or removed: the same Gaussian mechanism, with noise of norm ~ sqrt(k) instead of
# sqrt(d). Every example is still clipped as a whole (its K-averaged gradient) before the projection.


def flatten_grads(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensors of a {name: tensor} dict, flattened and concatenated in the dict's order."""
    return torch.cat([g.reshape(-1) for g in grads.values()])


def _unflatten_like(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for name, g in like.items():
        out[name] = flat[at:at + g.numel()].reshape(g.shape).to(g.dtype)
        at += g.numel()
    return out


def public_subspace(
    model: nn.Module,
    loss_fn: Callable,
    *public_batch: torch.Tensor,
    dim: int,
    clip_norm: float,
    chunk_size: int | None = None,
    per_layer_rules: bool = True,
) -> torch.Tensor:
    """An orthonormal basis [d, dim] of the top-`dim` principal directions (uncentred) of the
    clipped per-example gradients of PUBLIC examples at the model's current weights.

    d counts the trainable parameters, flattened in `named_parameters` order (as `flatten_grads`
    orders a gradient dict). Computed from the n x n Gram matrix in float64 (n = number of public
    examples >= dim), then re-orthonormalised. The examples must not be private: the basis is used
    without noise. `per_layer_rules` as in `per_sample_grads`.
    """
    validate_model(model)
    _check_trainable(model, clipping=False)
    _check_clip_norm(clip_norm)
    clip_norm = float(clip_norm)
    n = _check_batch(public_batch)
    if not isinstance(dim, int) or dim < 1 or dim > n:
        raise ValueError(f"dim={dim!r} must be an integer in [1, {n}] (the number of public examples)")
    _check_chunk_size(chunk_size)
    step = n if chunk_size is None else chunk_size
    # The n flat clipped gradients go straight into one [n, d] G, and the float64 Gram matrix and basis are built
    # from blocks of its columns: a rows list, its torch.cat and a float64 copy of G held 4.5-4.9 times n * d * 4
    # bytes at once, whatever the chunk (h135 F1, stop 53: about 16 GiB for the mnist preset at 512 examples).
    G = None
    for start in range(0, n, step):
        part = [t[start:start + step] for t in public_batch]
        grads, _ = _per_example(model, loss_fn, part, None, rules=per_layer_rules)
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)
        del grads
        norms = _norms64(flat)[:, None]
        factor = _clip_factors(norms, clip_norm, flat.dtype)
        flat = torch.where(_usable(norms, factor, flat.dtype), flat * factor.to(flat.dtype),
                           torch.zeros((), dtype=flat.dtype, device=flat.device))
        if G is None:
            G = flat.new_empty((n, flat.shape[1]))                # [n, d]
        G[start:start + flat.shape[0]] = flat
        del flat
    d = G.shape[1]
    block = max(1, _SUBSPACE_BLOCK_BYTES // (8 * n))              # columns of G per float64 block
    gram = torch.zeros((n, n), dtype=torch.float64, device=G.device)
    for a in range(0, d, block):
        cols = G[:, a:a + block].double()
        gram += cols @ cols.T                                    # the n x n Gram matrix, in float64
    del cols
    evals, U = torch.linalg.eigh(gram)                           # ascending
    top = torch.argsort(evals, descending=True)[:dim]
    if not bool((evals[top] > 0).all()):
        raise SubspaceSpanError(f"the public gradients span fewer than {dim} directions; lower the dimension")
    Ut = U[:, top] / evals[top].sqrt()
    V = torch.empty((d, dim), dtype=torch.float64, device=G.device)
    for a in range(0, d, block):
        V[a:a + block] = G[:, a:a + block].double().T @ Ut       # [d, dim], orthonormal up to rounding
    V, _ = torch.linalg.qr(V)
    return V.to(G.dtype).contiguous()


# Bytes of a float64 block of G's columns in `public_subspace`.
_SUBSPACE_BLOCK_BYTES = 64 * 2**20


def _spectral_norm(basis: torch.Tensor) -> float:
    """||basis||_2 computed in float64 from the stored (e.g. float32) entries."""
    gram = basis.double().T @ basis.double()
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())


def add_noise_in_subspace(
    grad_sum: dict[str, torch.Tensor],
    basis: torch.Tensor,
    *,
    noise_multiplier: float,
    clip_norm: float,
    expected_batch_size: float,
    generator: NoiseGenerator | None = None,
) -> dict[str, torch.Tensor]:
    """basis @ (basis^T G + N(0, (noise_multiplier * clip_norm)^2 I_k)) / expected_batch_size.

    G is the clipped sum of `clipped_grad_sum` over the trainable parameters (in the order of
    `basis`' rows); `basis` [d, k] must be public (e.g. `public_subspace`). Its spectral norm is
    checked to be <= 1 (an orthonormal basis, up to float rounding, is rescaled by its norm), so
    basis^T G has sensitivity clip_norm, as G does. The noise is drawn as in `add_noise`: `generator=None`
    is a fresh generator with a secret seed, never torch's global one.
    """
    _check_positive(clip_norm=clip_norm, expected_batch_size=expected_batch_size)
    clip_norm, expected_batch_size = float(clip_norm), float(expected_batch_size)
    flat = flatten_grads(grad_sum)
    if basis.dim() != 2 or basis.shape[0] != flat.numel():
        raise ValueError(f"basis has shape {tuple(basis.shape)}; it needs {flat.numel()} rows (the trainable "
                         "parameters) and one column per direction")
    if not bool(torch.isfinite(basis).all()):
        raise ValueError("basis has non-finite entries")
    norm = _spectral_norm(basis)
    if norm > 1.0:
        basis = basis / (norm * (1 + 1e-6))
    # The Gaussian mechanism of `add_noise` on the k projected coordinates (divided by B below).
    proj = add_noise({"proj": basis.T.to(flat.dtype) @ flat}, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                     expected_batch_size=1.0, generator=generator)["proj"]
    return _unflatten_like((basis.to(flat.dtype) @ proj) / expected_batch_size, grad_sum)
