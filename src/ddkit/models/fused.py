"""A ConvNet's first block (convolution, instance norm, ReLU, 2x2 average pool) in one pass, for
forwards without gradients on the CPU.

The first block of a ConvNet (Gidaris & Komodakis 2018, as the dataset-condensation papers use it)
turns a 1- or 3-channel image into a 128-channel map at full resolution; the instance norm, the
ReLU and the pool then each read and write that map, the largest of the network, although the
first convolution has only 2-3 % of the network's FLOPs. An instance norm after a convolution
needs no pass over the convolution's output, though: with ``p`` the ``K = C_in * k * k`` values
of the input patch under an output pixel and ``w_c`` the filter of channel ``c``, the output's
mean over the pixels is ``w_c . mean(p) + b_c`` and its variance ``w_c^T Cov(p) w_c``, where
``Cov(p)`` is the ``K x K`` covariance of one image's patches. So

    relu(norm(conv(x)))[c] = relu(p . w_c * s_c + beta_c - mean(p) . w_c * s_c),
    s_c = gamma_c / sqrt(w_c^T Cov(p) w_c + eps)

is one convolution with per-image filters ``w_c * s_c`` and per-image biases (the convolution's
own bias cancels). :func:`conv_instance_norm_relu_pool` computes it as a batched matrix product of
each image's patches with its filters, one product per pixel of the 2x2 pooling window (the pool's
factor 1/4 folded into the filters), adding the four ReLU outputs: the full-resolution map is never
stored, and the work runs in sub-batches of :data:`SUB_BATCH` images whose maps stay in the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.models.base import AvgPool2x2, is_instance_norm

#: Images per sub-batch: each of the four window products writes ``SUB_BATCH x H/2 x W/2 x C``
#: floats (2 MB for 16 images of 128 channels at 16 x 16), which a core's share of cache holds.
SUB_BATCH = 16


def fusable_first_block(layers: nn.Sequential | list, x: torch.Tensor) -> bool:
    """Whether ``layers[:4]`` on images ``x`` ``[N, C_in, H, W]`` can run as
    :func:`conv_instance_norm_relu_pool`: a CPU float32 forward without gradients, through a 2-d
    convolution (stride 1, no dilation or groups, zero padding), an instance norm
    (``GroupNorm(C, C)`` with affine), a ReLU and ddkit's 2x2 average pool, to an even-sided map;
    not while ``torch.compile`` traces (a compiled graph fuses the block its own way), nor where a
    forward hook watches one of the four layers (G-VBSM's convolution statistics, SRe2L's BatchNorm
    statistics: they read the layer's own input or output)."""
    if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or len(layers) < 4
            or torch.compiler.is_compiling()):
        return False
    conv, norm, relu, pool = (layers[i] for i in range(4))
    if any(_hooked(layer) for layer in (conv, norm, relu, pool)):  # hooks must see each layer run
        return False
    if not (type(conv) is nn.Conv2d and is_instance_norm(norm) and type(relu) is nn.ReLU
            and type(pool) is AvgPool2x2):
        return False
    if (conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str) or conv.weight.dtype != torch.float32):
        return False
    height = x.shape[2] + 2 * conv.padding[0] - conv.kernel_size[0] + 1
    width = x.shape[3] + 2 * conv.padding[1] - conv.kernel_size[1] + 1
    return height > 0 and width > 0 and height % 2 == 0 and width % 2 == 0


def _hooked(layer: nn.Module) -> bool:
    """Whether a forward hook (on ``layer`` or on every module) would run when ``layer`` runs."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def conv_instance_norm_relu_pool(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm, channels_last: bool,
                                 sub_batch: int = SUB_BATCH, out_dtype: torch.dtype | None = None,
                                 relu_sums: tuple[torch.Tensor, int] | None = None):
    """``AvgPool2d(2)(relu(norm(conv(x))))`` without storing the full-resolution map.

    Args:
        x: images ``[N, C_in, H, W]``, float32 on the CPU, no gradient needed.
        conv: a 3x3 (any ``k x k``) convolution with stride 1 and zero padding.
        norm: an instance norm ``GroupNorm(C, C)`` with affine.
        channels_last: the layout of the result (that of the next layer's weight).
        sub_batch: images per pass (their maps stay in the cache).
        out_dtype: the result's dtype (default ``x``'s): under bf16 autocast the next convolution
            casts its input to bf16 anyway, so each sub-batch is rounded while it is in the cache
            instead of in a pass over the whole result (the same values).
        relu_sums: optional ``(groups, count)``, ``groups`` long ``[N]`` in ``0 .. count - 1``:
            also return the float32 sums over each group's images of the block's full-resolution
            ReLU map ``relu(norm(conv(x)))``, added up window by window while each is in the cache
            (the map itself is never stored; DDM's class means of its first block).

    Returns:
        ``[N, C, H'/2, W'/2]`` with ``H' x W'`` the convolution's output size, channels-last or in
        the standard layout as asked. Equal to the
        layer-by-layer result up to float rounding (about 1e-6 relative; ``tests/test_fused.py``).
        Runs with autocast off: float32 throughout. With ``relu_sums``, the pair of that and the
        ReLU map's group sums ``[count, C, H', W']`` (in the same layout).
    """
    n, _, height, width = x.shape
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    out_h, out_w = height + 2 * ph - kh + 1, width + 2 * pw - kw + 1
    channels = conv.out_channels
    quarter = out_h * out_w // 4
    with torch.autocast("cpu", enabled=False):
        filters = conv.weight.detach().reshape(channels, -1).t()  # [K, C]
        k = filters.shape[0]
        gamma, beta = norm.weight.detach(), norm.bias.detach()
        out = torch.empty(n, quarter, channels, dtype=out_dtype or x.dtype)
        rounded = out.dtype != x.dtype
        scratch = torch.empty(min(sub_batch, n), quarter, channels, dtype=x.dtype)
        window_sums = torch.empty(min(sub_batch, n), quarter, channels, dtype=x.dtype) if rounded else None
        if relu_sums is not None:
            groups, count = relu_sums
            # per group and pixel of the pooling window; the ReLU outputs below carry the pool's 1/4
            relu_totals = torch.zeros(4, count, quarter, channels, dtype=x.dtype)  # index_add_ wants contiguous rows
        for start in range(0, n, sub_batch):
            images = x[start:start + sub_batch]
            m = images.shape[0]
            patches = F.unfold(images, (kh, kw), padding=(ph, pw))  # [m, K, P]
            mean = patches.mean(2)  # [m, K]
            centred = patches - mean[:, :, None]
            covariance = torch.bmm(centred, centred.transpose(1, 2)).div_(patches.shape[2])  # [m, K, K]
            # w_c^T Cov w_c and mean . w_c as sums of products, not matrix products: a matrix product's
            # rounding can depend on the row's place in the batch, and an image's result must not
            variance = ((covariance[:, :, :, None] * filters).sum(2) * filters).sum(1)  # [m, C]
            mean_response = (mean[:, :, None] * filters).sum(1)  # [m, C]
            scale = gamma * torch.rsqrt(variance + norm.eps) * 0.25  # the pool's 1/4 folded in
            per_image_filters = filters * scale[:, None, :]  # [m, K, C]
            bias = (beta * 0.25 - mean_response * scale)[:, None, :]  # [m, 1, C]
            # [m, 4, P/4, K]: the patches of the four pixels of each pooling window, window by window
            windows = (patches.view(m, k, out_h // 2, 2, out_w // 2, 2).permute(0, 3, 5, 2, 4, 1)
                       .reshape(m, 4, quarter, k))
            pooled = window_sums[:m] if rounded else out[start:start + m]
            for pixel in range(4):  # the first window's ReLU straight into the pooled sum, the others added
                relu = torch.baddbmm(bias, windows[:, pixel], per_image_filters,
                                     out=scratch[:m] if pixel else pooled).clamp_min_(0)
                if relu_sums is not None:
                    relu_totals[pixel].index_add_(0, groups[start:start + m], relu)
                if pixel:
                    pooled.add_(relu)
            if rounded:
                out[start:start + m] = pooled
    result = out.view(n, out_h // 2, out_w // 2, channels).permute(0, 3, 1, 2)
    result = result if channels_last else result.contiguous()
    if relu_sums is None:
        return result
    # [(dy, dx), count, (i, j), C] -> [count, 2i + dy, 2j + dx, C]; times 4 undoes the pool's factor (exact)
    maps = (relu_totals.mul_(4).view(2, 2, count, out_h // 2, out_w // 2, channels).permute(2, 3, 0, 4, 1, 5)
            .reshape(count, out_h, out_w, channels).permute(0, 3, 1, 2))
    return result, maps if channels_last else maps.contiguous()


def is_channels_last_weight(layer: nn.Module) -> bool:
    """Whether ``layer`` is a convolution whose weight ``[C_out, C_in, k, k]`` is stored
    channels-last (``C_in`` innermost), so that PyTorch runs it channels-last."""
    return isinstance(layer, nn.Conv2d) and layer.weight.stride(1) == 1 and layer.kernel_size != (1, 1)
