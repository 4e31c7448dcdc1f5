"""What crosses the network for a bundle variant, and how it turns back into a tensor.

A variant travels in one of four encodings: the float32 tensor at its split
(RAW), that tensor through the bundle's codec (CODEC, uint8 bytes), or, with no
model stage at all, the input crop as a JPEG (the cloud-only baseline) or a
lossless WebP. :class:`VariantRuntime` is a variant ready to run on a device
(projection convolutions, codec, wire shape). The head side makes a payload
(:func:`wire_payload`, :func:`image_payload`); the tail side checks one a
neighbour sent before it queues (:func:`check_payload`), decodes it on its own
so a bad one fails alone (:func:`decode_payload`), and copies the decoded
tensors once into a batch on the device (:func:`stack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ccied.pruning import CodecError, MediaError
from ccied.pruning.bundle import Bundle, Variant
from ccied.pruning.codec import CodecConfig, TensorCodec
from ccied.pruning.media import decode_image, encode_jpeg, encode_lossless, normalize
from ccied.pruning.models import ModelSpec
from ccied.pruning.transfer import projection_convs
from torch import nn

RAW = "raw"  # float32 tensor on the wire
CODEC = "codec"  # ccied.pruning.codec payload (uint8 bytes) on the wire
JPEG = "jpeg"  # a JPEG of the input crop (uint8 bytes): the cloud-only baseline
WEBP = "webp"  # the input crop as a lossless WebP (uint8 bytes): the faithful one
IMAGE_FORMATS = {JPEG: "JPEG", WEBP: "WEBP"}
MAX_JPEG_BYTES = 1 << 20


class BadTensorError(ValueError):
    """An intermediate tensor that this peer's tail cannot take."""


@dataclass
class VariantRuntime:
    variant: Variant
    index: int
    encode: nn.Module | None
    decode: nn.Module | None
    codec: TensorCodec | None
    wire_shape: tuple[int, ...]  # (1, k, H, W) after the projection

    @property
    def encoding(self) -> str:
        if self.variant.jpeg_quality is not None:
            return JPEG
        if self.variant.lossless:
            return WEBP
        return RAW if self.codec is None else CODEC

    def payload_bytes(self) -> float:
        if self.variant.bytes_per_frame:
            return self.variant.bytes_per_frame
        if self.variant.jpeg_quality is not None:
            return 13_000.0  # JPEG q90 of a 224x224 frame, median of the bundled clips
        if self.variant.lossless:
            return 42_000.0  # lossless WebP of the same crops (media.encode_lossless)
        values = int(np.prod(self.wire_shape))
        return values * (4 if self.variant.bits is None else self.variant.bits / 8)


def variant_runtime(bundle: Bundle, variant: Variant, device: torch.device) -> VariantRuntime:
    """``variant`` of ``bundle`` ready to run on ``device`` (an image variant runs no stage)."""
    if variant.is_image:
        return VariantRuntime(variant, -1, None, None, None, ())
    point = bundle.model.split_point(variant.split)
    encode = decode = None
    shape = (1, *point.output_shape)
    projection = bundle.projections.get(variant.name)
    if projection is not None:
        encode, decode = projection_convs(projection)
        encode, decode = encode.to(device), decode.to(device)
        shape = (1, projection.kept, *point.output_shape[1:])
    codec = None if variant.bits is None else TensorCodec(CodecConfig(bits=variant.bits))
    return VariantRuntime(variant, point.index, encode, decode, codec, shape)


# -- the head's side: a payload to send ----------------------------------------------


def wire_payload(runtime: VariantRuntime, at_variant: torch.Tensor) -> tuple[np.ndarray, str]:
    """The tensor at the variant's split (projected) as it travels, and its encoding."""
    wire = at_variant.cpu().numpy().astype(np.float32, copy=False)
    if runtime.codec is None:
        return np.ascontiguousarray(wire), RAW
    return np.frombuffer(runtime.codec.encode(wire), dtype=np.uint8), CODEC


def image_payload(runtime: VariantRuntime, crop: np.ndarray) -> tuple[np.ndarray, str]:
    """The input crop as an image variant sends it (JPEG or lossless WebP bytes)."""
    quality = runtime.variant.jpeg_quality
    image = encode_lossless(crop) if quality is None else encode_jpeg(crop, quality)
    return np.frombuffer(image, dtype=np.uint8), runtime.encoding


# -- the tail's side: a payload a neighbour sent -------------------------------------


def check_payload(
    variants: dict[str, VariantRuntime], variant: str, tensor: np.ndarray, encoding: str
) -> VariantRuntime:
    """Raise BadTensorError unless the payload fits this variant's tail."""
    runtime = variants.get(variant)
    if runtime is None:
        raise BadTensorError(f"unknown variant {variant!r}; this bundle has {list(variants)}")
    expected = runtime.encoding
    if encoding != expected:
        raise BadTensorError(f"variant {variant} travels as {expected}, got {encoding}")
    if encoding in IMAGE_FORMATS:
        if tensor.dtype != np.uint8 or tensor.ndim != 1 or tensor.size > MAX_JPEG_BYTES:
            raise BadTensorError("an image travels as one uint8 vector of at most 1 MiB")
        return runtime
    if encoding == RAW:
        if tuple(tensor.shape) != runtime.wire_shape:
            raise BadTensorError(
                f"tensor shape {tuple(tensor.shape)}, expected {runtime.wire_shape}"
            )
        if tensor.dtype != np.float32:
            raise BadTensorError(f"tensor dtype {tensor.dtype}, expected float32")
        if not np.isfinite(tensor).all():
            raise BadTensorError("tensor holds NaN or infinity")
    elif tensor.dtype != np.uint8 or tensor.ndim != 1:
        raise BadTensorError("a codec payload travels as one uint8 vector")
    return runtime


def decode_payload(runtime: VariantRuntime, tensor: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A checked payload as the tail's float32 input, (1, ...); BadTensorError if it
    does not decode. A raw tensor is not copied here: the batch copies it once."""
    if runtime.variant.is_image:
        try:
            pixels = decode_image(
                tensor.tobytes(), spec.input_size, IMAGE_FORMATS[runtime.encoding]
            )
            return normalize(pixels, spec).numpy()
        except MediaError as exc:
            raise BadTensorError(str(exc)) from exc
    if runtime.codec is None:
        return tensor
    try:
        values = runtime.codec.decode(tensor.tobytes())
    except CodecError as exc:
        raise BadTensorError(f"undecodable payload: {exc}") from exc
    if tuple(values.shape) != runtime.wire_shape:
        raise BadTensorError(f"payload shape {tuple(values.shape)}, expected {runtime.wire_shape}")
    return values


def stack(inputs: list[np.ndarray], device: torch.device, pinned: bool) -> torch.Tensor:
    """One (n, ...) batch on ``device``. The only copy of the payloads: from the
    (read-only) wire buffers into the batch, in pinned memory (``pinned``, on CUDA)
    so the transfer to the GPU is one asynchronous copy."""
    shape = (len(inputs), *inputs[0].shape[1:])
    host = torch.empty(shape, dtype=torch.float32, pin_memory=pinned)
    rows = host.numpy()
    for row, values in zip(rows, inputs, strict=True):
        row[...] = values[0]
    return host.to(device, non_blocking=True) if pinned else host
