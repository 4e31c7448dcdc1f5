"""The tensor codec: exact round trips, shrinking payloads, and refusal of malformed bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard
from ccied.pruning.codec import HEADER_BYTES, MAGIC, CodecConfig, TensorCodec
from ccied.pruning.errors import CodecError, PruningError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

CONFIGS = [
    CodecConfig(bits=bits, clip_sigma=clip, shared_scale=shared)
    for bits in (8, 6, 4, 2)
    for clip, shared in ((0.0, False), (3.0, False), (4.0, True))
]


def _activation(seed: int = 0, channels: int = 192) -> np.ndarray:
    """A (1, C, 7, 7) tensor shaped like a block output: per-channel scale and offset."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.05, 3.0, size=(1, channels, 1, 1))
    offset = rng.normal(size=(1, channels, 1, 1))
    return (rng.standard_normal((1, channels, 7, 7)) * scale + offset).astype(np.float32)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_decode_is_the_exact_dequantization(config: CodecConfig) -> None:
    codec = TensorCodec(config)
    x = _activation()
    decoded = codec.decode(codec.encode(x))
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    assert np.array_equal(decoded, codec.dequantize(codec.quantize(x)))
    if config.clip_sigma == 0:  # (clipping ranges depend on the std, which moves)
        # Quantizing the decoded tensor again changes nothing: the codes are stable.
        assert np.array_equal(codec.decode(codec.encode(decoded)), decoded)


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_min_max_error_is_half_a_step(bits: int) -> None:
    codec = TensorCodec(CodecConfig(bits=bits))
    x = _activation(1)
    quantized = codec.quantize(x)
    error = np.abs(codec.decode(codec.encode(x)) - x).reshape(x.shape[1], -1)
    step = quantized.scales.astype(np.float32)[:, None]
    # Half a step, plus the float16 rounding of the offset.
    assert (error <= step * 0.5 + np.abs(x).reshape(x.shape[1], -1) * 1e-3 + 1e-6).all()


def test_fewer_bits_fewer_bytes() -> None:
    x = _activation(2)
    sizes = [len(TensorCodec(CodecConfig(bits=b)).encode(x)) for b in (8, 6, 4, 2)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] < x.nbytes / 3  # 8 bits plus zstd beats float32 by far
    assert sizes[-1] < sizes[0] / 2.5


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.just(1), st.integers(1, 8), st.integers(1, 6), st.integers(1, 6)),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    st.sampled_from(CONFIGS),
)
def test_round_trip_any_tensor(x: np.ndarray, config: CodecConfig) -> None:
    codec = TensorCodec(config)
    decoded = codec.decode(codec.encode(x))
    assert np.array_equal(decoded, codec.dequantize(codec.quantize(x)))
    assert np.isfinite(decoded).all()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_only_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        TensorCodec().decode(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_payloads_raise_codec_error_or_decode_cleanly(data: st.DataObject) -> None:
    config = data.draw(st.sampled_from(CONFIGS))
    payload = bytearray(TensorCodec(config).encode(_activation(3, channels=16)))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        decoded = TensorCodec().decode(bytes(payload[:cut]))
    except CodecError:
        return
    assert decoded.shape[0] == 1 and decoded.dtype == np.float32
    assert np.isfinite(decoded).all()


def _payload(bits: int, flags: int, shape: tuple[int, int, int], body: bytes) -> bytes:
    header = struct.pack("<4sBBBBHHH", MAGIC, 1, bits, flags, 0, *shape) + b"\0\0"
    assert len(header) == HEADER_BYTES
    return header + zstandard.ZstdCompressor().compress(body)


def test_zip_bomb_is_refused_without_inflating() -> None:
    # A 2x2x2 tensor needs 2*(2+2) + 8 = 16 body bytes; this frame inflates to 64 MiB.
    bomb = _payload(8, 0, (2, 2, 2), b"\0" * (64 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(CodecError):
        TensorCodec().decode(bomb)


def test_header_lies_are_refused() -> None:
    good = TensorCodec().encode(_activation(4, channels=4))
    codec = TensorCodec()
    cases = {
        "magic": b"XXXX" + good[4:],
        "version": good[:4] + b"\x09" + good[5:],
        "bits": good[:5] + b"\x03" + good[6:],
        "flags": good[:6] + b"\x80" + good[7:],
        "zero shape": good[:8] + b"\0\0" + good[10:],
        "huge shape": _payload(8, 0, (4096, 1024, 1024), b""),
        "trailing": good + b"\0",
        "truncated": good[:-3],
        "short body": _payload(8, 0, (1, 2, 2), b"\0" * 7),
        "nan scale": _payload(8, 0, (1, 1, 1), np.float16([np.nan, 0]).tobytes() + b"\0"),
        "zero scale": _payload(8, 0, (1, 1, 1), np.float16([0, 0]).tobytes() + b"\0"),
        "wide codes": _payload(2, 0, (1, 1, 2), np.float16([1, 0]).tobytes() + b"\x07\0"),
        "packed 8 bits": _payload(8, 1, (1, 1, 1), np.float16([1, 0]).tobytes() + b"\0"),
    }
    for name, payload in cases.items():
        with pytest.raises(CodecError):
            codec.decode(payload)
        assert name  # (pytest names the case in the traceback's locals)


def test_bad_input_and_config_raise_codec_error() -> None:
    codec = TensorCodec()
    with pytest.raises(CodecError):
        codec.encode(np.zeros((2, 3, 4, 4), dtype=np.float32))
    with pytest.raises(CodecError):
        codec.encode(np.full((1, 3, 4, 4), np.nan, dtype=np.float32))
    with pytest.raises(CodecError):
        codec.decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        CodecConfig(bits=3)
    assert issubclass(CodecError, PruningError)


def test_constant_channels_round_trip() -> None:
    x = np.zeros((1, 3, 7, 7), dtype=np.float32)
    x[0, 1] = 2.5
    for config in CONFIGS:
        codec = TensorCodec(config)
        assert np.array_equal(codec.decode(codec.encode(x)), x)
