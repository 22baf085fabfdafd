"""Fused and fast-path autograd functions behind the building blocks of `model.layers`.

Each computes the same function as the plain PyTorch ops it stands for (the same values and gradients up to
float rounding); they differ only in what they keep for backward or in which kernels they call:

- `elu` (`_FastELU`): ELU from vectorised ops on the CPU, where PyTorch's `elu` runs a scalar `expm1`.
- `_DepthwiseConv`: a stride-1 depthwise conv whose backward takes faster CPU kernels than autograd's.
- `_BNSwishFunction`: swish(batchnorm(x)), keeping one activation for backward where the two ops keep two.
- `_BNSwishConvFunction`: conv(swish(batchnorm(x))), keeping only `x`.
- `_TwoBNSwishConvFunction`: two such blocks, the first conv depthwise (a decoder cell), keeping only `x`.

The fused ones save activation memory by recomputing, in backward, BN's output (and the Swish and depthwise
conv outputs) from the block's input and BN's saved statistics. The modules in `model.layers` decide where
each applies (device, gradients, autocast, layer shapes) and run the plain ops everywhere else; the compiled
CPU kernels `_depthwise_backward` calls live in `model.kernels`. What each saves: bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model import kernels


class _FastELU(torch.autograd.Function):
    """ELU (alpha 1) from vectorised kernels, `max(x, 0) + (exp(min(x, 0)) - 1)`, in place of PyTorch's CPU
    `elu`, which goes through a scalar `expm1`. Positive inputs pass exactly; negative ones differ from `expm1`
    by at most ~6e-8. The gradient is ELU's, from the saved output as PyTorch's own (1 for x > 0,
    y + 1 = exp(x) otherwise), so it keeps one tensor per call, as `F.elu` does.

    bf16 and fp16 inputs are computed in float32 and rounded once, as `F.elu` computes them: in their own
    precision `exp(x) - 1` cancels for small |x| (bf16 gives 0 for x = -0.001, and -0.0117 for -0.01). Their
    gradient comes from the saved input, as F.elu's does: y + 1 from a rounded y cancels near y = -1."""

    @staticmethod
    def forward(ctx, x):
        if x.dtype in _LOW_PRECISION:
            xf = x.float()
            ctx.save_for_backward(x)
            return (xf.clamp(min=0) + (xf.clamp(max=0).exp() - 1)).to(x.dtype)
        y = x.clamp(min=0) + (x.clamp(max=0).exp() - 1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        if saved.dtype in _LOW_PRECISION:  # the input: exp(x) from the rounded y + 1 would cancel near y = -1
            return (grad.float() * saved.float().clamp(max=0).exp()).to(grad.dtype)
        return grad * (saved.clamp(max=0) + 1)


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU: `_FastELU` on the CPU; PyTorch's `elu` on CUDA (fast there), in ONNX export (one `Elu` node, which
    onnxruntime runs vectorised), under tracing and under torch.compile (which fuses it itself)."""
    if (
        x.device.type != "cpu"
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
    ):
        return F.elu(x)
    return _FastELU.apply(x)


# At or below this many pixels (H*W) per map, a depthwise conv's weight gradient without a compiled kernel
# is computed as k*k shifted products on CPU: on such small maps oneDNN's weight gradient is slower than the
# products; from 8x8 maps up it is the faster one.
DEPTHWISE_SHIFTED_MAX_PIXELS = 16


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise stride-1 convolution with a faster CPU backward (decoder cells' 5x5 conv).

    See `_depthwise_backward`. Same values as `F.conv2d`'s autograd up to float rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, None, 1, padding, 1, x.size(1))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = _depthwise_backward(grad_out, x, weight, ctx.padding, ctx.needs_input_grad[:2])
        return grad_x, grad_w, None


def _depthwise_backward(grad_out, x, weight, p: int, needs: tuple[bool, bool]):
    """(grad_x, grad_w) of a depthwise stride-1 conv with padding p.

    grad_x is the convolution of grad_out with the flipped kernel, so it runs oneDNN's forward kernel, which is
    faster than its backward-data kernel on the decoder's shapes. grad_w[c, i, j] = sum over (b, h, w) of
    x_pad[b, c, h + i, w + j] * grad_out[b, c, h, w]: from a compiled kernel where one applies
    (`model.kernels`), else k*k broadcast products for small maps and oneDNN's weight gradient for larger ones.
    """
    k, c = weight.size(-1), x.size(1)
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    grad_x = grad_w = None
    if needs[0]:
        grad_x = F.conv2d(grad_out, weight.flip(2, 3), None, 1, k - 1 - p, 1, c)
    if needs[1]:
        grad_w = kernels.dw_grad_weight(x, grad_out, k, p)
        if grad_w is None and x.size(-1) * x.size(-2) <= DEPTHWISE_SHIFTED_MAX_PIXELS:
            grad_w = kernels.dw_grad_weight_by_shift(x, grad_out, k, p)
        elif grad_w is None:
            grad_w = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], c, [False, True, False]
            )[1]
        grad_w = grad_w.view_as(weight)
    return grad_x, grad_w


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


class ConvArgs(NamedTuple):
    """The conv of a fused BN-Swish-conv block: its stride, padding and groups, and whether its backward takes
    `_depthwise_backward` (see `WNConv2d._fast_depthwise`)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    fast_depthwise: bool


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a conv in on `device_type`, or None (autocast off, or a device such as
    `meta` that has no autocast)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _cast(dtype, *tensors):
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def _bn_recompute(x, weight, bias, running_mean, running_var, save_mean, save_invstd, training, eps):
    """BN's forward output again, from the statistics the forward pass used (batch or running)."""
    if training:
        mean, var = save_mean, save_invstd.pow(-2) - eps
    else:
        mean, var = running_mean, running_var
    return torch.ops.aten.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]


def _bn_backward(grad_y, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps):
    return torch.ops.aten.native_batch_norm_backward(
        grad_y,
        x,
        weight,
        running_mean,
        running_var,
        save_mean,
        save_invstd,
        training,
        eps,
        [True, True, True],
    )


class _BNSwishFunction(torch.autograd.Function):
    """swish(batchnorm(x)) that saves only `x` and per-channel statistics, recomputing BN's output in backward.

    The unfused pair keeps two activations alive (BN's input and Swish's input); this keeps one. Forward and
    backward use ATen's native batch-norm and SiLU kernels, so the recomputation costs one cheap pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, running_mean, running_var, save_mean, save_invstd)
        ctx.training, ctx.eps = training, eps
        return F.silu(y)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        bn = (running_mean, running_var, save_mean, save_invstd, ctx.training, ctx.eps)
        y = _bn_recompute(x, weight, bias, *bn)
        grad_y = torch.ops.aten.silu_backward(grad_out, y)
        grad_x, grad_w, grad_b = _bn_backward(grad_y, x, weight, *bn)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _bn_swish_conv(x, bn_w, bn_b, running_mean, running_var, training, momentum, eps, w, b, conv_args, dtype):
    """conv(swish(batchnorm(x))) and BN's saved statistics; the conv in `dtype` (autocast's) when given."""
    y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x, bn_w, bn_b, running_mean, running_var, training, momentum, eps
    )
    a, wc, bc = _cast(dtype, F.silu(y, inplace=True), w, b)  # y is not needed again
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        out = F.conv2d(a, wc, bc, conv_args.stride, conv_args.padding, 1, conv_args.groups)
    return out, save_mean, save_invstd


def _bn_swish_conv_backward(grad_out, x, bn_w, bn_b, bn, w, has_bias, conv_args, dtype, recomputed=None):
    """Gradients (x, BN weight, BN bias, conv weight, conv bias) of `_bn_swish_conv` from its input `x`.

    `bn` is (running_mean, running_var, save_mean, save_invstd, training, eps); `recomputed` the pair
    (BN output, Swish output) where the caller already has it, else both are recomputed from `x`.
    """
    if recomputed is None:
        y = _bn_recompute(x, bn_w, bn_b, *bn)
        a = F.silu(y)
    else:
        y, a = recomputed
    a, wc = _cast(dtype, a, w, None)[:2]
    if conv_args.fast_depthwise:
        grad_a, grad_w = _depthwise_backward(grad_out, a, wc, conv_args.padding[0], (True, True))
        grad_b = None
    else:
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            a,
            wc,
            [wc.size(0)] if has_bias else None,
            conv_args.stride,
            conv_args.padding,
            [1, 1],
            False,
            [0, 0],
            conv_args.groups,
            [True, True, has_bias],
        )
    grad_y = torch.ops.aten.silu_backward(grad_a.to(y.dtype), y)
    grad_x, grad_bn_w, grad_bn_b = _bn_backward(grad_y, x, bn_w, *bn)
    grad_w = grad_w.to(w.dtype)
    grad_b = grad_b.to(w.dtype) if grad_b is not None else None
    return grad_x, grad_bn_w, grad_bn_b, grad_w, grad_b


class _BNSwishConvFunction(torch.autograd.Function):
    """conv(swish(batchnorm(x))) that saves only `x`, BN's statistics and the conv weight.

    The conv's input (the Swish output) is recomputed in backward from `x`, so a BN-Swish-conv block keeps one
    activation alive where `_BNSwishFunction` followed by a conv keeps two (the conv saves its input).
    Under autocast the conv runs in the autocast dtype in both passes, as autocast itself would run it.
    """

    @staticmethod
    def forward(ctx, x, bn_w, bn_b, running_mean, running_var, training, momentum, eps, w, b, conv_args):
        dtype = autocast_dtype(x.device.type)
        out, save_mean, save_invstd = _bn_swish_conv(
            x, bn_w, bn_b, running_mean, running_var, training, momentum, eps, w, b, conv_args, dtype
        )
        ctx.save_for_backward(x, bn_w, bn_b, running_mean, running_var, save_mean, save_invstd, w)
        ctx.training, ctx.eps, ctx.dtype, ctx.conv_args = training, eps, dtype, conv_args
        ctx.has_bias = b is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bn_w, bn_b, running_mean, running_var, save_mean, save_invstd, w = ctx.saved_tensors
        bn = (running_mean, running_var, save_mean, save_invstd, ctx.training, ctx.eps)
        grad_x, grad_bn_w, grad_bn_b, grad_w, grad_b = _bn_swish_conv_backward(
            grad_out, x, bn_w, bn_b, bn, w, ctx.has_bias, ctx.conv_args, ctx.dtype
        )
        return grad_x, grad_bn_w, grad_bn_b, None, None, None, None, None, grad_w, grad_b, None


class _TwoBNSwishConvFunction(torch.autograd.Function):
    """conv2(swish(bn2(dwconv(swish(bn1(x)))))): two BN-Swish-conv blocks, the first conv depthwise, that keep
    only `x` for backward (fp32; no autocast).

    Two `_BNSwishConvFunction`s keep `x` and the depthwise conv's output; this recomputes that output in
    backward instead, at the price of one more depthwise forward, the cheapest conv of a decoder cell. A
    decoder cell then keeps one hidden-width activation for backward instead of two.
    """

    @staticmethod
    def forward(ctx, x, bn1_w, bn1_b, rm1, rv1, bn2_w, bn2_b, rm2, rv2, w1, w2, b2, bn1, bn2, args1, args2):
        # bn1, bn2: (training, momentum, eps) of each BN
        d, mean1, invstd1 = _bn_swish_conv(x, bn1_w, bn1_b, rm1, rv1, *bn1, w1, None, args1, None)
        out, mean2, invstd2 = _bn_swish_conv(d, bn2_w, bn2_b, rm2, rv2, *bn2, w2, b2, args2, None)
        ctx.save_for_backward(
            x, bn1_w, bn1_b, rm1, rv1, mean1, invstd1, bn2_w, bn2_b, rm2, rv2, mean2, invstd2, w1, w2
        )
        ctx.bn1, ctx.bn2, ctx.args1, ctx.args2, ctx.has_bias = bn1, bn2, args1, args2, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bn1_w, bn1_b, rm1, rv1, mean1, invstd1, bn2_w, bn2_b, rm2, rv2, mean2, invstd2, w1, w2 = (
            ctx.saved_tensors
        )
        bn1 = (rm1, rv1, mean1, invstd1, ctx.bn1[0], ctx.bn1[2])
        bn2 = (rm2, rv2, mean2, invstd2, ctx.bn2[0], ctx.bn2[2])
        y1 = _bn_recompute(x, bn1_w, bn1_b, *bn1)
        a1 = F.silu(y1)
        args1 = ctx.args1
        d = F.conv2d(a1, w1, None, args1.stride, args1.padding, 1, args1.groups)
        grad_d, grad_bn2_w, grad_bn2_b, grad_w2, grad_b2 = _bn_swish_conv_backward(
            grad_out, d, bn2_w, bn2_b, bn2, w2, ctx.has_bias, ctx.args2, None
        )
        del d
        grad_x, grad_bn1_w, grad_bn1_b, grad_w1, _ = _bn_swish_conv_backward(
            grad_d, x, bn1_w, bn1_b, bn1, w1, False, args1, None, recomputed=(y1, a1)
        )
        return (
            grad_x, grad_bn1_w, grad_bn1_b, None, None, grad_bn2_w, grad_bn2_b, None, None,
            grad_w1, grad_w2, grad_b2, None, None, None, None,
        )  # fmt: skip
