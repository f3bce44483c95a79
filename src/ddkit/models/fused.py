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

:class:`FirstBlockWithGradients` is the same block where gradients are wanted (the synthetic images
of distribution matching, a student's training): its backward recomputes each window's product
instead of reading a stored map, and needs no pass over a full-resolution gradient either (the
instance norm's backward reduces to per-image sums and a ``K x K`` product, below).
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
    """Whether ``layers[:4]`` on images ``x`` ``[N, C_in, H, W]`` can run in one pass
    (:func:`conv_instance_norm_relu_pool`, or :class:`FirstBlockWithGradients` where gradients are
    wanted): CPU float32 images, through a 2-d
    convolution (stride 1, no dilation or groups, zero padding), an instance norm
    (``GroupNorm(C, C)`` with affine), a ReLU and ddkit's 2x2 average pool, to an even-sided map;
    not while ``torch.compile`` traces (a compiled graph fuses the block its own way), nor where a
    forward or backward hook watches one of the four layers (G-VBSM's convolution statistics,
    SRe2L's BatchNorm statistics: they read the layer's own input or output)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or len(layers) < 4
            or torch.compiler.is_compiling()):
        return False
    conv, norm, relu, pool = (layers[i] for i in range(4))
    if any(_hooked(layer) for layer in (conv, norm, relu, pool)):  # hooks must see each layer run
        return False
    if not (type(conv) is nn.Conv2d and is_instance_norm(norm) and type(relu) is nn.ReLU
            and type(pool) is AvgPool2x2):
        return False
    if (conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str) or conv.weight.dtype != torch.float32
            or norm.weight.dtype != torch.float32):
        return False
    height, width = _output_size(x, conv)
    return height > 0 and width > 0 and height % 2 == 0 and width % 2 == 0


#: The fewest output channels and output pixels per image from which a first block runs in one
#: pass (:func:`one_pass_pays`).
ONE_PASS_MIN_CHANNELS, ONE_PASS_MIN_PIXELS = 64, 256


def one_pass_pays(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the one-pass block (:func:`conv_instance_norm_relu_pool` without gradients,
    :func:`first_block_with_gradients` with them) is faster than the layers for ``conv`` on images
    ``x``: one input channel and at least :data:`ONE_PASS_MIN_CHANNELS` output channels on maps of
    at least :data:`ONE_PASS_MIN_PIXELS` pixels. With three input channels oneDNN's convolution is
    fast and the one pass's 27-term products are not: 0.31x to 0.82x at 32 x 32 (widths 32 and
    128); on 8 x 8 maps or 32 channels per-image overheads dominate (0.33x to 0.85x); from 16 x 16
    x 128 and 32 x 32 x 64 on, 1.05x to 1.88x (0.96x once, 16 x 16 x 128 with weights' gradients;
    ``benchmarks/first_block_speed.py --sizes``, docs/speed.md)."""
    out_h, out_w = _output_size(x, conv)
    return (conv.in_channels == 1 and conv.out_channels >= ONE_PASS_MIN_CHANNELS
            and out_h * out_w >= ONE_PASS_MIN_PIXELS)


def _hooked(layer: nn.Module) -> bool:
    """Whether a forward or backward hook (on ``layer`` or on every module) would run when
    ``layer`` runs or its gradient is computed."""
    module = nn.modules.module
    return bool(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                or layer._backward_pre_hooks or module._global_forward_hooks or module._global_forward_pre_hooks
                or module._global_backward_hooks or module._global_backward_pre_hooks)


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
    n = x.shape[0]
    out_h, out_w = _output_size(x, conv)
    channels = conv.out_channels
    quarter = out_h * out_w // 4
    # a channels-last result is written pixel by pixel ([P/4, C] rows per image), a standard-layout
    # one channel by channel ([C, P/4]): either way no pass over the whole result to change layout
    rows = (quarter, channels) if channels_last else (channels, quarter)
    with torch.autocast("cpu", enabled=False):
        filters = conv.weight.detach().reshape(channels, -1).t()  # [K, C]
        gamma, beta = norm.weight.detach(), norm.bias.detach()
        out = torch.empty(n, *rows, dtype=out_dtype or x.dtype)
        rounded = out.dtype != x.dtype
        scratch = torch.empty(min(sub_batch, n), *rows, dtype=x.dtype)
        window_sums = torch.empty(min(sub_batch, n), *rows, dtype=x.dtype) if rounded else None
        if relu_sums is not None:
            groups, count = relu_sums
            # per group and pixel of the pooling window; the ReLU outputs below carry the pool's 1/4
            relu_totals = torch.zeros(4, count, *rows, dtype=x.dtype)  # index_add_ wants contiguous rows
        for start in range(0, n, sub_batch):
            images = x[start:start + sub_batch]
            m = images.shape[0]
            moments = _PatchMoments(images, filters, conv, norm.eps)
            per_image_filters, bias = moments.quarter_filters(filters, gamma, beta)
            pooled = window_sums[:m] if rounded else out[start:start + m]
            responses = moments.window_responses(per_image_filters, bias, moments.windows(channels_last), channels_last,
                                                 scratch[:m], first_out=pooled)
            for pixel, relu in enumerate(responses):
                relu.clamp_min_(0)  # the first window's ReLU is written straight into the pooled sum
                if relu_sums is not None:
                    relu_totals[pixel].index_add_(0, groups[start:start + m], relu)
                if pixel:
                    pooled.add_(relu)
            if rounded:
                out[start:start + m] = pooled
    if channels_last:
        result = out.view(n, out_h // 2, out_w // 2, channels).permute(0, 3, 1, 2)
    else:
        result = out.view(n, channels, out_h // 2, out_w // 2)
    if relu_sums is None:
        return result
    # times 4 undoes the pool's factor (exact)
    totals = relu_totals.mul_(4).view(2, 2, count, *rows)
    if channels_last:  # [(dy, dx), count, (i, j), C] -> [count, 2i + dy, 2j + dx, C]
        maps = (totals.view(2, 2, count, out_h // 2, out_w // 2, channels).permute(2, 3, 0, 4, 1, 5)
                .reshape(count, out_h, out_w, channels).permute(0, 3, 1, 2))
    else:  # [(dy, dx), count, C, (i, j)] -> [count, C, 2i + dy, 2j + dx]
        maps = (totals.view(2, 2, count, channels, out_h // 2, out_w // 2).permute(2, 3, 4, 0, 5, 1)
                .reshape(count, channels, out_h, out_w))
    return result, maps


def _output_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    """The ``(H', W')`` of ``conv``'s output on ``x`` ``[N, C_in, H, W]`` (stride 1)."""
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    return x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1


class _PatchMoments:
    """One sub-batch's convolution patches and, per image and channel, the mean and inverse
    standard deviation of the convolution's response over the pixels (what the instance norm
    divides by), from each image's ``K x K`` patch covariance.

    Attributes: ``patches`` ``[m, K, P]`` (``F.unfold``), ``mean`` ``[m, K]``, ``centred``
    ``[m, K, P]``, ``covariance`` ``[m, K, K]`` (divided by ``P``, as the norm's biased variance),
    ``mean_response`` ``[m, C]`` (``w_c . mean``, without the convolution's bias, which the norm
    removes) and ``inverse_std`` ``[m, C]`` (``1 / sqrt(w_c^T Cov w_c + eps)``).
    """

    def __init__(self, images: torch.Tensor, filters: torch.Tensor, conv: nn.Conv2d, eps: float):
        self.out_size = _output_size(images, conv)
        self.patches = F.unfold(images, conv.kernel_size, padding=conv.padding)
        self.mean = self.patches.mean(2)
        self.centred = self.patches - self.mean[:, :, None]
        self.covariance = torch.bmm(self.centred, self.centred.transpose(1, 2)).div_(self.patches.shape[2])
        # w_c^T Cov w_c and mean . w_c as sums of products, not matrix products: a matrix product's
        # rounding can depend on the row's place in the batch, and an image's result must not
        variance = ((self.covariance[:, :, :, None] * filters).sum(2) * filters).sum(1)
        self.mean_response = (self.mean[:, :, None] * filters).sum(1)
        self.inverse_std = torch.rsqrt(variance + eps)

    def quarter_filters(self, filters: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
        """Per-image filters ``[m, K, C]`` and biases ``[m, C]`` whose response on a patch is a
        quarter of the normalised output ``gamma_c (w_c . (p - mean) / std_c) + beta_c``."""
        scale = gamma * self.inverse_std * 0.25  # the pool's 1/4 folded in
        return filters * scale[:, None, :], beta * 0.25 - self.mean_response * scale

    def windows(self, pixel_rows: bool) -> torch.Tensor:
        """The patches of the four pixels ``(dy, dx)`` of each 2x2 pooling window, window by window:
        ``[m, 4, P/4, K]`` (``pixel_rows``) or ``[m, 4, K, P/4]``."""
        m, k = self.patches.shape[:2]
        out_h, out_w = self.out_size
        grid = self.patches.view(m, k, out_h // 2, 2, out_w // 2, 2)
        if pixel_rows:
            return grid.permute(0, 3, 5, 2, 4, 1).reshape(m, 4, -1, k)
        return grid.permute(0, 3, 5, 1, 2, 4).reshape(m, 4, k, -1)

    @staticmethod
    def window_responses(per_image_filters: torch.Tensor, bias: torch.Tensor, windows: torch.Tensor,
                         pixel_rows: bool, out: torch.Tensor, first_out=None):
        """For each pixel of the pooling window in turn, a quarter of the normalised convolution
        output at that pixel of every window: ``[m, P/4, C]`` (``pixel_rows``) or ``[m, C, P/4]``,
        written into ``out`` (the first into ``first_out`` if given) and overwritten by the next;
        from :meth:`quarter_filters` and :meth:`windows` in the same orientation."""
        if not pixel_rows:
            per_image_filters, bias = per_image_filters.transpose(1, 2).contiguous(), bias[:, :, None]
        else:
            bias = bias[:, None, :]
        for pixel in range(4):
            target = first_out if pixel == 0 and first_out is not None else out
            if pixel_rows:
                yield torch.baddbmm(bias, windows[:, pixel], per_image_filters, out=target)
            else:
                yield torch.baddbmm(bias, per_image_filters, windows[:, pixel], out=target)


class FirstBlockWithGradients(torch.autograd.Function):
    """:func:`conv_instance_norm_relu_pool` (standard layout) with a backward, for the first block
    of a ConvNet where gradients are wanted: of the images (distribution matching's synthetic
    side), and of the convolution's and the norm's weights (training).

    Layer by layer, the backward reads and writes three full-resolution maps (the pool's, the
    ReLU's and the norm's gradients) besides the forward's stored maps. Here, with ``g`` the
    gradient of the pooled output, ``z`` the normalised map recomputed window by window from the
    patches, ``dz = g / 4`` where ``z > 0`` (else 0), ``A_c = gamma_c / std_c`` and ``P`` pixels,
    the instance norm's backward is

        dL/du_c = A_c (dz_c - mean(dz_c) - xhat_c mean(dz_c xhat_c)),    xhat_c = w_c . (p - m) / std_c

    so the gradient of each patch is ``sum_c A_c dz_c w_c - v - M (p - m)``, with
    ``v = sum_c A_c mean(dz_c) w_c`` and ``M = sum_c A_c mean(dz_c xhat_c) / std_c  w_c w_c^T``
    (``K x K``): one product of ``dz`` with the filters per window and per-image sums; and
    ``sum(dz_c xhat_c) = (sum g_c y_c - beta_c sum(dz_c)) / gamma_c`` needs only the pooled output
    ``y``. The weights' gradients need ``E_c = sum dz_c p``, one more product per window, computed only
    when a weight wants its gradient: ``dbeta_c = sum dz_c``, ``dgamma_c = (w_c . E_c - (w_c . m)
    sum dz_c) / std_c`` and ``dw_c = A_c (E_c - sum(dz_c) m - dgamma_c Cov w_c / std_c)``; the
    convolution's bias gets 0 (the norm removes it). Values equal autograd's layer by layer to float
    rounding (``tests/test_fused.py``). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, conv: nn.Conv2d, norm: nn.GroupNorm, out_dtype, sub_batch):
        """The pooled block output ``[N, C, H'/2, W'/2]`` (standard layout, ``out_dtype``) of
        images ``x`` ``[N, C_in, H, W]``; ``weight`` ... ``beta`` are the layers' own parameters,
        passed so that autograd sees them."""
        ctx.layers, ctx.sub_batch = (conv, norm), sub_batch
        ctx.save_for_backward(x, weight, gamma, beta)  # saved: an in-place change before the backward is an error
        return conv_instance_norm_relu_pool(x, conv, norm, channels_last=False, sub_batch=sub_batch,
                                            out_dtype=out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        """The gradients of the images ``[N, C_in, H, W]``, the convolution's weight and bias and
        the norm's gamma and beta (each None where not wanted), from ``grad`` ``[N, C, H'/2, W'/2]``."""
        (x, weight, gamma, beta), (conv, norm) = ctx.saved_tensors, ctx.layers
        wants_x, wants_weight, wants_bias, wants_gamma, wants_beta = ctx.needs_input_grad[:5]
        weights_wanted = wants_weight or wants_gamma or wants_beta
        n, channels = x.shape[0], conv.out_channels
        with torch.autocast("cpu", enabled=False):
            filters = weight.reshape(channels, -1).t()  # [K, C]
            k = filters.shape[0]
            grad = grad.reshape(n, channels, -1)
            grad_x = torch.empty_like(x) if wants_x else None
            grad_weight = torch.zeros(channels, k, dtype=x.dtype) if wants_weight else None
            grad_gamma = torch.zeros(channels, dtype=x.dtype) if wants_gamma else None
            grad_beta = torch.zeros(channels, dtype=x.dtype) if wants_beta else None
            # [m, C, P/4] buffers, reused by every sub-batch (memory still in the cache)
            rows = (max(min(ctx.sub_batch, n), 2), channels, grad.shape[2])
            masked_buffer, pooled_buffer, response_buffer = (torch.empty(rows, dtype=x.dtype) for _ in range(3))
            for start in range(0, n, ctx.sub_batch):
                images = x[start:start + ctx.sub_batch]
                g = grad[start:start + images.shape[0]].to(x.dtype)  # [m, C, P/4]
                count = images.shape[0]
                if count == 1:
                    # a batched product of one image with 9-row filters rounds otherwise than the same
                    # image's in a batch of several: a copy beside it keeps its result independent
                    # of its place in the batch (split runs), the copy's share is dropped below
                    images, g = images.expand(2, *images.shape[1:]), g.expand(2, *g.shape[1:])
                m = images.shape[0]
                moments = _PatchMoments(images, filters, conv, norm.eps)
                pixels = moments.patches.shape[2]
                window_grads = torch.empty(m, k, 4, pixels // 4, dtype=x.dtype) if wants_x else None
                masked, pooled = masked_buffer[:m], pooled_buffer[:m]  # dz * 4, the block's output y
                masked_sum = torch.zeros(m, channels, dtype=x.dtype)
                moment_sums = torch.zeros(m, channels, k, dtype=x.dtype) if weights_wanted else None
                per_image_filters, bias = moments.quarter_filters(filters, gamma, beta)  # A_c w_c / 4
                windows = moments.windows(pixel_rows=False)
                responses = moments.window_responses(per_image_filters, bias, windows, False, response_buffer[:m],
                                                     first_out=pooled)
                for pixel, response in enumerate(responses):
                    torch.ops.aten.threshold_backward.grad_input(g, response, 0, grad_input=masked)
                    masked_sum.add_(masked.sum(2))
                    response.clamp_min_(0)
                    if pixel:
                        pooled.add_(response)
                    if wants_x:  # sum_c A_c dz_c w_c, the patches' gradient before the norm's terms
                        torch.bmm(per_image_filters, masked, out=window_grads[:, :, pixel])
                    if weights_wanted:
                        moment_sums.baddbmm_(masked, windows[:, pixel].transpose(1, 2))
                dz_sum = masked_sum.mul_(0.25)  # [m, C]
                inverse_std = moments.inverse_std
                if wants_x:
                    # A_c mean(dz_c xhat_c) / std_c = (sum g y - beta sum dz) / (P var_c): gamma cancels
                    curvature = ((torch.mul(g, pooled, out=masked).sum(2) - beta * dz_sum) * inverse_std.square()
                                 / pixels)
                    shift = ((gamma * inverse_std * dz_sum / pixels)[:, None, :] * filters).sum(2)  # v [m, K]
                    # M [m, K, K] as sums of products (an einsum's rounding depends on the batch)
                    mixing = ((filters * curvature[:, None, :])[:, :, None, :] * filters).sum(3)
                    out_h, out_w = moments.out_size
                    patch_grads = (window_grads.view(m, k, 2, 2, out_h // 2, out_w // 2).permute(0, 1, 4, 2, 5, 3)
                                   .reshape(m, k, pixels))
                    patch_grads = patch_grads - shift[:, :, None] - torch.bmm(mixing, moments.centred)
                    grad_x[start:start + count] = F.fold(patch_grads[:count], images.shape[2:], conv.kernel_size,
                                                     padding=conv.padding)
                if weights_wanted:
                    moment_sums.mul_(0.25)  # E [m, C, K]
                    d_gamma = ((filters.t() * moment_sums).sum(2) - moments.mean_response * dz_sum) * inverse_std
                    if wants_gamma:
                        grad_gamma += d_gamma[:count].sum(0)
                    if wants_beta:
                        grad_beta += dz_sum[:count].sum(0)
                    if wants_weight:
                        covariance_filters = torch.bmm(moments.covariance, filters.expand(m, k, channels))  # [m, K, C]
                        grad_weight += ((gamma * inverse_std)[:, :, None]
                                        * (moment_sums - dz_sum[:, :, None] * moments.mean[:, None, :]
                                           - (d_gamma * inverse_std)[:, :, None] * covariance_filters.transpose(1, 2))
                                        )[:count].sum(0)
        grad_bias = torch.zeros_like(conv.bias) if wants_bias else None
        return (grad_x, grad_weight.view_as(weight) if wants_weight else None, grad_bias, grad_gamma, grad_beta,
                None, None, None, None)


def first_block_with_gradients(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm,
                               out_dtype: torch.dtype | None = None, sub_batch: int = SUB_BATCH) -> torch.Tensor:
    """``AvgPool2d(2)(relu(norm(conv(x))))`` ``[N, C, H'/2, W'/2]`` (standard layout) for images
    ``x`` ``[N, C_in, H, W]`` (CPU float32), differentiable in ``x`` and in the layers' parameters
    (:class:`FirstBlockWithGradients`), without storing the full-resolution map or its gradient."""
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    return FirstBlockWithGradients.apply(x, conv.weight, bias, norm.weight, norm.bias, conv, norm,
                                         out_dtype or x.dtype, sub_batch)


def is_channels_last_weight(layer: nn.Module) -> bool:
    """Whether ``layer`` is a convolution whose weight ``[C_out, C_in, k, k]`` is stored
    channels-last (``C_in`` innermost), so that PyTorch runs it channels-last."""
    return isinstance(layer, nn.Conv2d) and layer.weight.stride(1) == 1 and layer.kernel_size != (1, 1)
