"""Tensor codec: the bytes an intermediate tensor becomes on the wire.

API::

    codec = TensorCodec(CodecConfig(bits=8))
    data = codec.encode(tensor)          # float32 (1, C, H, W) -> bytes
    tensor = codec.decode(data)          # bytes -> float32 (1, C, H, W)
    codec.decode(codec.encode(x)) == codec.dequantize(codec.quantize(x))  # bit for bit

A tensor is quantized per channel with an affine map (``value = code * scale +
offset``), the range of each channel optionally clipped at ``mean +- clip_sigma *
std`` (a few outliers otherwise waste most of the levels), codes of fewer than 8
bits are bit-packed, and the whole body (scales, offsets, codes) is compressed with
zstd. ``shared_scale`` uses one step for every channel: after a PCA transfer layer
(:mod:`ccied.pruning.transfer`) the channels have very different variances, and an
equal step across them is the rate-distortion optimal allocation for an entropy
coder (low-variance channels collapse to a few codes that zstd nearly erases).

The payload is self-describing: a 16-byte header (magic, version, bits, flags,
shape) then one zstd frame. :meth:`TensorCodec.decode` trusts none of it: sizes are
bounded, the zstd frame is decompressed with a maximum output size equal to the
size the header implies (no zip bombs), scales and offsets must be finite, codes
must fit their bit width, and anything malformed raises :class:`CodecError`, never
another exception. Decoding does not need the encoder's config: a peer decodes any
payload of any bit width.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import numpy as np
import zstandard
from ccied.pruning.errors import CodecError

log = logging.getLogger(__name__)

MAGIC = b"CCTC"
CODEC_VERSION = 1
SUPPORTED_BITS = (2, 4, 6, 8)
DEFAULT_BITS = 8
# Clip each channel's range at mean +- this many standard deviations (0: min-max).
DEFAULT_CLIP_SIGMA = 0.0
DEFAULT_SHARED_SCALE = False
DEFAULT_ZSTD_LEVEL = 3
# Bounds a decoder enforces before it allocates anything.
MAX_CHANNELS = 4096
MAX_SIDE = 1024
MAX_ELEMENTS = 4 * 1024 * 1024
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

# magic, version, bits, flags, reserved, channels, height, width (little-endian).
_HEADER = struct.Struct("<4sBBBBHHH")
_HEADER_PAD = 2  # the header is 16 bytes; the last two are zero
HEADER_BYTES = _HEADER.size + _HEADER_PAD
_FLAG_PACKED = 1  # codes are bit-packed (else one byte per code)
_FLAG_SHARED_SCALE = 2  # one scale for all channels
_KNOWN_FLAGS = _FLAG_PACKED | _FLAG_SHARED_SCALE
_FLOAT16 = np.dtype("<f2")


@dataclass(frozen=True)
class CodecConfig:
    """How the encoder quantizes; the decoder reads everything it needs from the payload."""

    bits: int = DEFAULT_BITS
    clip_sigma: float = DEFAULT_CLIP_SIGMA
    shared_scale: bool = DEFAULT_SHARED_SCALE
    zstd_level: int = DEFAULT_ZSTD_LEVEL

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise CodecError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if not (self.clip_sigma == 0.0 or 0.5 <= self.clip_sigma <= 100.0):
            raise CodecError(f"clip_sigma must be 0 or in [0.5, 100], got {self.clip_sigma}")
        if not 1 <= self.zstd_level <= 22:
            raise CodecError(f"zstd_level must be in 1..22, got {self.zstd_level}")


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes (uint8, one per element, shape (C, H*W)) with per-channel scale and offset."""

    bits: int
    shape: tuple[int, int, int, int]
    codes: np.ndarray
    scales: np.ndarray  # float16, (C,) or (1,) when shared
    offsets: np.ndarray  # float16, (C,)


class TensorCodec:
    """Quantize + bit-pack + zstd a (1, C, H, W) float32 tensor, and the exact inverse."""

    def __init__(self, config: CodecConfig | None = None) -> None:
        self.config = config or CodecConfig()
        self._compressor = zstandard.ZstdCompressor(level=self.config.zstd_level)
        self._decompressor = zstandard.ZstdDecompressor()

    def quantize(self, tensor: np.ndarray) -> QuantizedTensor:
        """Per-channel affine quantization of a finite float32 tensor of shape (1, C, H, W)."""
        array = np.asarray(tensor)
        if array.ndim != 4 or array.shape[0] != 1:
            raise CodecError(f"tensor must have shape (1, C, H, W), got {array.shape}")
        _check_shape(int(array.shape[1]), int(array.shape[2]), int(array.shape[3]))
        flat = array.reshape(array.shape[1], -1).astype(np.float32, copy=False)
        if not np.isfinite(flat).all():
            raise CodecError("tensor holds NaN or infinite values")
        levels = (1 << self.config.bits) - 1
        low = flat.min(axis=1)
        high = flat.max(axis=1)
        if self.config.clip_sigma > 0:
            mean = flat.mean(axis=1)
            spread = self.config.clip_sigma * flat.std(axis=1)
            low = np.maximum(low, mean - spread)
            high = np.minimum(high, mean + spread)
        offsets = _to_float16(low)
        ranges = high.astype(np.float64) - offsets.astype(np.float64)
        if self.config.shared_scale:
            ranges = np.array([ranges.max(initial=0.0)])
        scales = _to_float16(np.where(ranges > 0, ranges / levels, 1.0))
        # float16 rounding can shrink a step to 0 (or overflow): use 1.0 there instead.
        scales = np.where(np.isfinite(scales) & (scales > 0), scales, 1.0).astype(_FLOAT16)
        step = scales.astype(np.float32)[:, None]
        base = offsets.astype(np.float32)[:, None]
        codes = np.clip(np.rint((flat - base) / step), 0, levels).astype(np.uint8)
        c, h, w = (int(d) for d in array.shape[1:])
        return QuantizedTensor(self.config.bits, (1, c, h, w), codes, scales, offsets)

    @staticmethod
    def dequantize(quantized: QuantizedTensor) -> np.ndarray:
        """``code * scale + offset`` in float32, shape (1, C, H, W)."""
        step = quantized.scales.astype(np.float32)[:, None]
        base = quantized.offsets.astype(np.float32)[:, None]
        values = quantized.codes.astype(np.float32) * step + base
        return values.reshape(quantized.shape)

    def encode(self, tensor: np.ndarray) -> bytes:
        """The wire payload of a (1, C, H, W) float32 tensor (CodecError if it is not one)."""
        return self.serialize(self.quantize(tensor))

    def serialize(self, quantized: QuantizedTensor) -> bytes:
        """Header + zstd(scales, offsets, codes); codes packed when that compresses smaller."""
        _, c, h, w = quantized.shape
        shared = quantized.scales.shape[0] == 1 and c > 1
        head = quantized.scales.astype(_FLOAT16).tobytes() + quantized.offsets.tobytes()
        codes = quantized.codes.reshape(-1)
        # Packing saves bytes before zstd; but zstd's entropy stage works on bytes,
        # so unpacked codes can come out smaller (many repeated codes): keep the smaller.
        candidates = [(0, self._compressor.compress(head + codes.tobytes()))]
        if quantized.bits < 8:
            packed = _pack(codes, quantized.bits)
            candidates.append((_FLAG_PACKED, self._compressor.compress(head + packed)))
        packed_flag, body = min(candidates, key=lambda item: len(item[1]))
        flags = packed_flag | (_FLAG_SHARED_SCALE if shared else 0)
        header = _HEADER.pack(MAGIC, CODEC_VERSION, quantized.bits, flags, 0, c, h, w)
        return header + b"\0" * _HEADER_PAD + body

    def decode(self, data: bytes) -> np.ndarray:
        """The float32 (1, C, H, W) tensor of a payload; CodecError for anything malformed."""
        return self.dequantize(self.parse(data))

    def parse(self, data: bytes) -> QuantizedTensor:
        """Validate a payload and return its codes, scales and offsets."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CodecError(f"payload must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_PAYLOAD_BYTES:
            raise CodecError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
        if len(data) < HEADER_BYTES:
            raise CodecError(f"payload of {len(data)} bytes is shorter than the header")
        magic, version, bits, flags, reserved, c, h, w = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CodecError("not a ccied tensor payload (bad magic)")
        if version != CODEC_VERSION:
            raise CodecError(f"unsupported codec version {version}")
        if bits not in SUPPORTED_BITS:
            raise CodecError(f"unsupported bit width {bits}")
        if flags & ~_KNOWN_FLAGS or reserved or data[_HEADER.size : HEADER_BYTES] != b"\0\0":
            raise CodecError("unknown flags or non-zero reserved bytes")
        _check_shape(c, h, w)
        packed = bool(flags & _FLAG_PACKED)
        if packed and bits == 8:
            raise CodecError("8-bit codes are never packed")
        n_scales = 1 if flags & _FLAG_SHARED_SCALE else c
        count = c * h * w
        code_bytes = (count * bits + 7) // 8 if packed else count
        expected = 2 * (n_scales + c) + code_bytes
        frame = data[HEADER_BYTES:]
        try:
            # The frame must declare exactly the size the header implies, so nothing
            # larger is ever inflated; libzstd checks the declared size as it decodes.
            declared = zstandard.frame_content_size(frame)
            if declared != expected:
                raise CodecError(f"payload body declares {declared} bytes, expected {expected}")
            stream = self._decompressor.decompressobj()
            body = stream.decompress(frame)
        except zstandard.ZstdError as exc:  # corrupt or truncated frame
            raise CodecError(f"undecodable payload body: {exc}") from exc
        if len(body) != expected or not stream.eof or stream.unused_data:
            raise CodecError("payload body is truncated, oversized or followed by other bytes")
        scales = np.frombuffer(body, dtype=_FLOAT16, count=n_scales)
        offsets = np.frombuffer(body, dtype=_FLOAT16, count=c, offset=2 * n_scales)
        if not (np.isfinite(scales).all() and np.isfinite(offsets).all()):
            raise CodecError("payload holds non-finite scales or offsets")
        if not (scales > 0).all():
            raise CodecError("payload holds non-positive scales")
        raw = np.frombuffer(body, dtype=np.uint8, offset=2 * (n_scales + c))
        codes = _unpack(raw, bits, count) if packed else raw
        if bits < 8 and int(codes.max(initial=0)) >= 1 << bits:
            raise CodecError(f"payload holds codes wider than {bits} bits")
        return QuantizedTensor(bits, (1, c, h, w), codes.reshape(c, h * w), scales, offsets)


def _check_shape(c: int, h: int, w: int) -> None:
    """Raise CodecError for a shape outside the bounds a decoder accepts."""
    if not (1 <= c <= MAX_CHANNELS and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise CodecError(f"tensor shape (1, {c}, {h}, {w}) outside the codec's bounds")
    if c * h * w > MAX_ELEMENTS:
        raise CodecError(f"tensor of {c * h * w} elements exceeds {MAX_ELEMENTS}")


def _to_float16(values: np.ndarray) -> np.ndarray:
    """float16 with overflow saturated (activations beyond 65504 are not expected)."""
    finfo = np.finfo(np.float16)
    return np.asarray(np.clip(values, finfo.min, finfo.max), dtype=_FLOAT16)


# Codes per group and bytes per group: a whole number of bytes holds a whole group.
_GROUPS = {2: (4, 1), 4: (2, 1), 6: (4, 3)}


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes of ``bits`` bits (most significant first) into bytes."""
    per_group, group_bytes = _GROUPS[bits]
    padded = np.zeros(-(-codes.size // per_group) * per_group, dtype=np.uint32)
    padded[: codes.size] = codes
    groups = padded.reshape(-1, per_group)
    word = np.zeros(groups.shape[0], dtype=np.uint32)
    for i in range(per_group):
        word |= groups[:, i] << np.uint32(bits * (per_group - 1 - i))
    out = np.empty((groups.shape[0], group_bytes), dtype=np.uint8)
    for j in range(group_bytes):
        out[:, j] = (word >> np.uint32(8 * (group_bytes - 1 - j))) & np.uint32(0xFF)
    return out.tobytes()[: (codes.size * bits + 7) // 8]


def _unpack(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack` for ``count`` codes."""
    per_group, group_bytes = _GROUPS[bits]
    n_groups = -(-count // per_group)
    padded = np.zeros(n_groups * group_bytes, dtype=np.uint32)
    padded[: raw.size] = raw
    groups = padded.reshape(n_groups, group_bytes)
    word = np.zeros(n_groups, dtype=np.uint32)
    for j in range(group_bytes):
        word |= groups[:, j] << np.uint32(8 * (group_bytes - 1 - j))
    mask = np.uint32((1 << bits) - 1)
    codes = np.empty((n_groups, per_group), dtype=np.uint8)
    for i in range(per_group):
        codes[:, i] = (word >> np.uint32(bits * (per_group - 1 - i))) & mask
    return codes.reshape(-1)[:count]
