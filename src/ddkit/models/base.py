"""The common base of every ddkit network: logits, an embedding, and named intermediate taps.

Distillation methods need more than logits. Distribution matching compares embeddings, feature
matching compares intermediate maps, and evaluators swap the classifier head. :class:`TapModel`
gives all models one interface for this:

* ``model(x)`` returns logits ``[N, num_classes]``.
* ``model.embed(x)`` returns the flattened final feature ``[N, embedding_dim]``, which is what
  ``model.classifier`` (always an ``nn.Linear``) receives.
* ``model.forward_taps(x, names)`` returns a dict of named intermediate tensors. It stops computing
  once it has the last one asked for.

A subclass only has to write :meth:`TapModel._stream`, a generator that runs the network in order
and yields ``(tap_name, tensor)`` at each tap point. It must yield every name in ``tap_names``,
ending with ``"embedding"`` and then ``"logits"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.errors import DDKitError

NORMS = ("instance", "batch", "group", "layer", "none")
#: Largest map (H * W pixels) that a GroupNorm on the CPU gets in the standard layout; see :func:`norm_layout`.
GROUP_NORM_CONTIGUOUS_PIXELS = 256

#: Values per image (pixels x channels) from which :func:`channels_last_instance_norm` normalises
#: image by image (``F.batch_norm`` over one image's pixels, one call each) rather than all images'
#: rows at once. One thread, 640 channels-last maps: at 16 x 16 x 128 values per image 16.6 against
#: 20.1 ms in float32 and 13.2 against 26.8 ms in bf16; at 16 x 16 x 96 as fast in float32 and 1.5x
#: faster in bf16; at 8 x 8 x 128 the per-call cost makes it about 2x slower (docs/speed.md).
PER_IMAGE_NORM_VALUES = 24576


@dataclass(frozen=True)
class TapSums:
    """A request to :meth:`TapModel.forward_taps` for the sums of some taps over groups of images
    instead of every image's tensor (the matching engine's class means of DDM's block maps).

    Attributes:
        names: the taps to sum (a subset of the requested taps).
        groups: long ``[N]``, the group of each input image, each in ``0 .. count - 1``.
        count: the number of groups.
    """

    names: frozenset
    groups: torch.Tensor
    count: int


def group_sums(values: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """The float32 sums ``[count, ...]`` of the rows of ``values`` ``[N, ...]`` per group
    (``groups``: long ``[N]``), a channels-last map summed in memory order as ``[N, H, W, C]``
    (PyTorch's CPU reductions over the first dimension of the channels-last view are about 10x
    slower) and returned channels-last."""
    values = values.float()
    if values.dim() == 4 and not values.is_contiguous() and values.is_contiguous(memory_format=torch.channels_last):
        rows = values.permute(0, 2, 3, 1)
        return rows.new_zeros(count, *rows.shape[1:]).index_add_(0, groups, rows).permute(0, 3, 1, 2)
    return values.new_zeros(count, *values.shape[1:]).index_add_(0, groups, values)


class TapModel(nn.Module):
    """Base class of all ddkit models.

    Attributes:
        in_channels: image channels the model expects (1 or 3 usually).
        num_classes: width of the logits.
        image_size: side of the square input images the model was built for.
        embedding_dim: width ``D`` of :meth:`embed`'s output, i.e. ``classifier.in_features``.
        classifier: the final ``nn.Linear(embedding_dim, num_classes)``.

    Inputs are ``[N, in_channels, image_size, image_size]``. Models with a flatten before the
    classifier (convnet, mlp, alexnet, vgg11) need exactly that size. Models with a global pool
    (resnet18) take any spatial size and only check the channels.
    """

    #: whether the spatial size of the input must equal ``image_size`` (False for global-pool nets)
    fixed_input_size: bool = True

    def __init__(self, in_channels: int, num_classes: int, image_size: int, *, arch: str) -> None:
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.embedding_dim = 0  # set by the subclass
        self._tap_names: tuple[str, ...] = ()  # set by the subclass

    @property
    def tap_names(self) -> tuple[str, ...]:
        """Names :meth:`forward_taps` accepts, in the order the network computes them."""
        return self._tap_names

    # -- to be written by subclasses -------------------------------------------------------------

    def _stream(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Run the network on ``x`` and yield ``(tap_name, tensor)`` in compute order."""
        raise NotImplementedError

    def _stream_for(self, x: torch.Tensor, wanted: set[str], sums: TapSums | None = None,
                    summed: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`_stream` for a call that needs only the taps ``wanted``: a subclass may skip
        computing taps outside it, and may put the group sums of taps in ``sums.names`` into
        ``summed`` itself instead of yielding them (see :class:`SequentialTapModel`)."""
        return self._stream(x)

    # -- public interface ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``x`` ``[N, C, H, W]``."""
        return self.forward_taps(x, ("logits",))["logits"]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened final feature ``[N, embedding_dim]`` (the classifier's input)."""
        return self.forward_taps(x, ("embedding",))["embedding"]

    def forward_taps(self, x: torch.Tensor, taps: Sequence[str], sums: TapSums | None = None) -> dict[str, torch.Tensor]:
        """Named intermediate tensors for images ``x`` ``[N, C, H, W]``.

        Args:
            x: input batch.
            taps: names from :attr:`tap_names`. A single string is accepted as one name.
            sums: optional; the taps in ``sums.names`` come back as float32 sums over the groups
                of images ``[sums.count, ...]`` (:func:`group_sums`) instead of ``[N, ...]``. A
                model may compute them without storing every image's tensor (ConvNet's one-pass
                first block sums its ReLU map while it is in the cache).

        Returns:
            dict mapping each requested name to its tensor, in the requested order. Computation
            stops after the last requested tap, so ``forward_taps(x, ["block0"])`` is cheap.
            Returned tensors are not changed afterwards by in-place operations.

        Raises:
            DDKitError: unknown tap name, input of the wrong shape, or ``sums`` naming a tap not
            asked for or without one group per image.
        """
        if isinstance(taps, str):
            taps = (taps,)
        wanted = list(taps)
        unknown = [t for t in wanted if t not in self._tap_names]
        if unknown:
            raise DDKitError(
                f"unknown tap(s) {', '.join(map(repr, unknown))} for model {self.arch!r}; "
                f"choose from: {', '.join(self._tap_names)}"
            )
        self._check_input(x)
        if sums is not None and (not set(sums.names) <= set(wanted) or tuple(sums.groups.shape) != (x.shape[0],)):
            raise DDKitError(f"tap sums over {sorted(sums.names)} with groups of shape {tuple(sums.groups.shape)} do "
                             f"not fit taps {wanted} of {x.shape[0]} images; sum requested taps, one group per image")
        to_sum = sums.names if sums is not None else frozenset()
        pending = set(wanted)
        found: dict[str, torch.Tensor] = {}
        if pending:
            summed: dict[str, torch.Tensor] = {}  # sums the model computed itself
            for name, value in self._stream_for(x, pending, sums, summed):
                if name in pending:
                    found[name] = group_sums(value, sums.groups, sums.count) if name in to_sum else value
                    pending.discard(name)
                pending.difference_update(summed)
                if not pending:
                    break
            found.update(summed)
        return {t: found[t] for t in wanted}

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DDKitError(
                f"model {self.arch!r} expects images [N, {self.in_channels}, H, W], got {got}; "
                f"pass a 4-d batch with {self.in_channels} channel(s)"
            )
        if self.fixed_input_size and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise DDKitError(
                f"model {self.arch!r} was built for {self.image_size}x{self.image_size} images, "
                f"got {x.shape[2]}x{x.shape[3]}; resize the images or create the model with the "
                f"right image_size"
            )

    def extra_repr(self) -> str:
        """The architecture and sizes, shown by ``print(model)``."""
        return (
            f"arch={self.arch!r}, in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"image_size={self.image_size}, embedding_dim={self.embedding_dim}"
        )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- helpers shared by the model files ----------------------------------------------------------


def check_choice(arch: str, option: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise DDKitError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise DDKitError(
            f"{arch}: {option}={value!r} is not valid; choose one of: {', '.join(choices)}"
        )
    return value


def check_positive_int(arch: str, option: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise DDKitError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DDKitError(f"{arch}: {option}={value!r} is not valid; give an integer >= {minimum}")
    return value


def make_norm(kind: str, channels: int, arch: str = "model") -> nn.Module | None:
    """Normalisation layer for a ``[N, channels, H, W]`` map, or None for ``"none"``.

    ``instance`` is ``GroupNorm(C, C)`` (per-sample, per-channel, with affine), ``group`` is
    ``GroupNorm(4, C)``, ``layer`` is ``GroupNorm(1, C)`` (per-sample over C, H, W, with a
    per-channel affine), ``batch`` is ``BatchNorm2d(C)``. None of them mixes samples except
    ``batch`` in training mode.
    """
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "group":
        if channels % 4:
            raise DDKitError(
                f"{arch}: norm='group' uses 4 groups and needs a width divisible by 4, got "
                f"{channels}; change the width or the norm"
            )
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return None
    raise DDKitError(f"{arch}: norm={kind!r} is not valid; choose one of: {', '.join(NORMS)}")


def norm_layout(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``h`` in the layout ``layer`` runs fastest on: a channels-last CPU map of at most
    :data:`GROUP_NORM_CONTIGUOUS_PIXELS` pixels is copied to the standard layout before a GroupNorm
    (instance, group and layer norm here), else ``h`` itself.

    PyTorch's CPU GroupNorm is slow on small channels-last maps: one thread, 128 channels, 128 maps,
    forward and backward, 3.6x faster on 16x16 maps after the copy and 4x on 8x8 ones (at 32x32
    the channels-last kernel is as fast or faster, so large maps keep their layout). The values are
    those of the channels-last kernel up to float rounding (about 1e-6).
    """
    if isinstance(layer, nn.GroupNorm) and _small_channels_last_cpu_map(h):
        return h.contiguous()
    return h


def is_instance_norm(layer: nn.Module) -> bool:
    """Whether ``layer`` is an instance norm as ddkit builds it: ``GroupNorm(C, C)`` with affine."""
    return isinstance(layer, nn.GroupNorm) and layer.num_groups == layer.num_channels and layer.affine


def channels_last_instance_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Instance norm of a channels-last map ``h`` ``[N, C, H, W]`` without leaving its layout:
    ``(h - mean) / sqrt(var + eps) * weight + bias`` with the biased variance over ``H, W`` per
    sample and channel, as ``nn.GroupNorm(C, C)`` computes it, returned channels-last.

    The per-pixel rows ``[N, H*W, C]`` are a view of the map. From :data:`PER_IMAGE_NORM_VALUES`
    values per image each image's rows ``[H*W, C]`` are normalised by ``F.batch_norm`` in training
    mode (per channel over the rows: an instance norm of that image; its statistics in float32 for a
    bf16 map, rounded once), else all rows at once with the variance of the centred rows (two
    passes, as stable as GroupNorm's). For the forward of
    a network without gradients on maps of 16 x 16 pixels or fewer (the CPU kernel for
    channels-last GroupNorm is 3x slower there, and a copy to the standard layout leaves the ReLU
    and pooling after it on the slow standard-layout kernels: one thread, 128 maps of 128 channels,
    norm and ReLU 5.0 ms here against 16.3 ms channels-last and 6.9 ms after a copy, then a 2x2
    average pool 1.4 ms channels-last against 10.6 ms; docs/speed.md). Equal to GroupNorm up to
    float rounding (about 1e-6); a bf16 or fp16 map (autocast) is normalised in fp32 and returned in
    its own precision, as GroupNorm's kernel does.
    """
    n, c, height, width = h.shape
    rows = h.permute(0, 2, 3, 1).view(n, height * width, c)
    # batch_norm needs 2+ rows; a compiled graph gets the vectorised form (a loop would unroll)
    if height * width > 1 and height * width * c >= PER_IMAGE_NORM_VALUES and not torch.compiler.is_compiling():
        out = torch.empty_like(rows)
        weight, bias = weight.float(), bias.float()
        for image in range(n):
            out[image] = F.batch_norm(rows[image], None, None, weight, bias, True, 0.0, eps)
        return out.view(n, height, width, c).permute(0, 3, 1, 2)
    if rows.dtype in (torch.float16, torch.bfloat16):  # statistics in fp32, as GroupNorm's kernel keeps them
        rows = rows.float()
    centred = rows - rows.mean(1, keepdim=True)
    variance = (centred * centred).mean(1, keepdim=True)
    out = centred.mul_(weight.float() * torch.rsqrt(variance + eps)).add_(bias.float())
    return out.to(h.dtype).view(n, height, width, c).permute(0, 3, 1, 2)


def run_norm(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``layer(h)``, in the layout and by the kernel that are fastest for it on this device.

    On the CPU, a channels-last map of at most :data:`GROUP_NORM_CONTIGUOUS_PIXELS` pixels before an
    instance norm is normalised in place by :func:`channels_last_instance_norm` when no gradient is
    recorded (the real side of distribution matching, evaluation), else copied to the standard
    layout first (:func:`norm_layout`); every other layer gets ``h`` as it is.
    """
    if (not torch.is_grad_enabled() and is_instance_norm(layer) and _small_channels_last_cpu_map(h)):
        return channels_last_instance_norm(h, layer.weight, layer.bias, layer.eps)
    return layer(norm_layout(layer, h))


def run_layer(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``layer(h)`` for a layer of a feature stack: :func:`run_norm`'s kernels for norms, and under
    CPU autocast a one-channel convolution whose weight is being trained in float32.

    oneDNN's bf16 weight gradient of a convolution with one input channel is slow: ConvNet-3's
    first convolution (1 -> 128 channels, 28 x 28 images, padding 3), 256 images, forward and
    backward, one thread, 102.5 ms in bf16 against 63.6 ms in float32 with the output rounded to
    bf16 (docs/speed.md); that layer has 2.4 % of the network's FLOPs. So in training under
    autocast it runs in float32 and its output is rounded to the autocast dtype, as the bf16
    convolution's would be (the rounding of its input and weight is skipped: slightly more
    accurate). With three input channels bf16 is the faster one and is kept.
    """
    if (type(layer) is nn.Conv2d and layer.in_channels == 1 and layer.weight.requires_grad
            and torch.is_grad_enabled() and h.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            out = layer(h.float())
        return out.to(torch.get_autocast_dtype("cpu"))
    return run_norm(layer, h)


def _small_channels_last_cpu_map(h: torch.Tensor) -> bool:
    return (h.device.type == "cpu" and h.dim() == 4 and h.shape[2] * h.shape[3] <= GROUP_NORM_CONTIGUOUS_PIXELS
            and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last))


class _HalvingAverage(torch.autograd.Function):
    """2x2 average pooling with stride 2 of a standard-layout map with even sides (see :class:`AvgPool2x2`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pairs_of_rows = x.view(n, c, h // 2, 2 * w)
        rows = pairs_of_rows[..., :w] + pairs_of_rows[..., w:]  # [n, c, h/2, w]: contiguous reads
        pairs = rows.view(n, c, h // 2, w // 2, 2)
        return (pairs[..., 0] + pairs[..., 1]).mul_(0.25)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = grad.shape
        # each value twice along a row, then each row twice: two plain copies, 2-4x faster than one
        # copy of a [n, c, h, 2, w, 2] broadcast (the same values)
        rows = (grad * 0.25)[..., None].expand(n, c, h, w, 2).reshape(n, c, h, 2 * w)
        return torch.cat((rows, rows), 3).view(n, c, 2 * h, 2 * w)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` (the same module for state dicts and ``isinstance``), with its own
    kernel for standard-layout CPU maps of even sides.

    PyTorch's CPU kernel for average pooling in the standard layout is several times slower than
    two additions of halves: one thread, 256 maps of 128 channels, 80.6 against 13.3 ms at 32x32
    and 22.2 against 3.2 ms at 16x16; in relabelling (a BatchNorm ConvNet teacher's forward over
    views) the pools were 44 % of the time (docs/speed.md). The backward spreads each gradient over
    its 2x2 window by copying each row's values twice, then each row twice (PyTorch's fills a zero
    map first; 100 maps of 128 channels at 16 x 16 pixels, one thread: 6.9 ms against 14.1 ms for
    one copy of the broadcast 2x2 window, docs/speed.md). Values equal the standard
    kernel's up to float rounding (the four terms are added in another order). Channels-last maps,
    odd sides, other devices and ``torch.compile`` (which fuses its own) use the standard kernel.
    """

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled map ``[N, C, H // 2, W // 2]`` of ``x`` ``[N, C, H, W]``."""
        if (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and x.shape[2] % 2 == 0
                and x.shape[3] % 2 == 0 and not torch.compiler.is_compiling()):
            return _HalvingAverage.apply(x)
        return super().forward(x)


class SequentialTapModel(TapModel):
    """A :class:`TapModel` made of one ``nn.Sequential`` feature stack and a linear classifier.

    Subclasses build ``layers`` and call :meth:`_finish`; taps are named after the layer indices in
    ``tap_after`` (e.g. ``{2: "block0"}`` yields the output of layer 2 as ``"block0"``), followed by
    ``"features"`` (the last feature map), ``"embedding"`` (flattened) and ``"logits"``.
    """

    def _finish(self, layers: list, tap_after: dict[int, str], feature_shape: tuple[int, int, int],
                num_classes: int) -> None:
        self.features = nn.Sequential(*layers)
        self._tap_after = tap_after
        self.feature_shape = feature_shape
        channels, height, width = feature_shape
        self.embedding_dim = channels * height * width
        self.classifier = nn.Linear(self.embedding_dim, num_classes)
        self._tap_names = (*tap_after.values(), "features", "embedding", "logits")

    def _stream(self, x: torch.Tensor, start: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """The taps from layer ``start`` of ``features`` on, ``x`` being that layer's input."""
        h = x
        for i in range(start, len(self.features)):
            h = run_layer(self.features[i], h)
            name = self._tap_after.get(i)
            if name is not None:
                yield name, h
        yield "features", h
        h = torch.flatten(h, 1)
        yield "embedding", h
        yield "logits", self.classifier(h)

    def _stream_for(self, x: torch.Tensor, wanted: set[str], sums: TapSums | None = None,
                    summed: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`_stream`, with the first block in one pass where :meth:`one_pass_first_block` can
        (its ReLU map summed into ``summed`` when ``sums`` asks for it)."""
        pooled = self.one_pass_first_block(x, wanted, sums, summed)
        if pooled is None:
            return self._stream(x)
        if summed is not None and not set(wanted) - set(summed):
            return iter(())
        return self._stream(pooled, start=4)

    def one_pass_first_block(self, x: torch.Tensor, wanted: set[str] = frozenset(), sums: TapSums | None = None,
                             summed: dict | None = None) -> torch.Tensor | None:
        """The output of ``features[:4]`` on ``x`` in one pass, or None where it does not apply.

        On the CPU, a first block of convolution, instance norm, ReLU and 2x2 average pool where
        the one pass pays (:func:`ddkit.models.fused.one_pass_pays`: one input channel, 64 or more
        channels on maps of 16 x 16 pixels or more) runs without gradients as
        :func:`ddkit.models.fused.conv_instance_norm_relu_pool` (1.39x faster on a Fashion-MNIST
        ConvNet's first block, docs/speed.md), in the layout of the layer after it, when its inner
        taps are not ``wanted``, or only the ReLU's, as group sums (``sums``, e.g. DDM's class means
        of ``block0``): those go into ``summed`` as ``[sums.count, C, H, W]``. Where a gradient is
        wanted (of the images or of the block's weights) it runs as
        :func:`ddkit.models.fused.first_block_with_gradients` when no inner tap is wanted and the
        next layer takes the standard layout.
        """
        from ddkit.models import fused  # here, not at the top: ddkit.models.fused imports this module

        inner = {self._tap_after[i] for i in range(4) if i in self._tap_after} & set(wanted)
        relu_tap = self._tap_after.get(2)
        summable = sums is not None and summed is not None and inner == {relu_tap} and relu_tap in sums.names
        if (inner and not summable) or not fused.fusable_first_block(self.features, x):
            return None
        conv, norm = self.features[0], self.features[1]
        if not fused.one_pass_pays(conv, x):  # 3 input channels, narrow or small maps: the layers are faster
            return None
        after = self.features[4] if len(self.features) > 4 else conv
        channels_last = fused.is_channels_last_weight(after)
        # under CPU autocast the next convolution rounds its input to the autocast dtype anyway
        rounded = (torch.is_autocast_enabled("cpu") and len(self.features) > 4
                   and isinstance(self.features[4], nn.Conv2d))
        out_dtype = torch.get_autocast_dtype("cpu") if rounded else None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in (*conv.parameters(),
                                                                                           *norm.parameters()))):
            if inner or channels_last:
                return None
            return fused.first_block_with_gradients(x, conv, norm, out_dtype=out_dtype)
        result = fused.conv_instance_norm_relu_pool(x, conv, norm, channels_last=channels_last, out_dtype=out_dtype,
                                                    relu_sums=(sums.groups, sums.count) if inner else None)
        if not inner:
            return result
        pooled, summed[relu_tap] = result
        return pooled


class GlobalPoolTapModel(TapModel):
    """A :class:`TapModel` ending in global average pooling and a linear classifier.

    Takes any spatial input size. Subclasses yield their own stage taps and then
    ``yield from self._pooled_tail(h)``, which gives ``"features"`` (the last map), ``"embedding"``
    (its channel means) and ``"logits"``.
    """

    fixed_input_size = False

    def _pooled_tail(self, h: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        yield "features", h
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        yield "embedding", h
        yield "logits", self.classifier(h)

