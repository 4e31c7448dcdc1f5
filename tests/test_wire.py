"""Wire protocol: round trips, and every malformed input becomes one ProtocolError."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import numpy as np
import pytest
from ccied.peer.defaults import Role
from ccied.peer.errors import ProtocolError
from ccied.peer.wire import (
    DTYPES,
    MAX_TENSOR_BYTES,
    WIRE_VERSION,
    CacheCommand,
    CacheOp,
    CacheShare,
    CacheSync,
    ErrorCode,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    Ping,
    Pong,
    Source,
    StatusReply,
    StatusRequest,
    Submit,
    decode,
    encode,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

ids = st.text(min_size=1, max_size=40)
texts = st.text(max_size=60)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
counts = st.integers(min_value=0, max_value=2**40)
tensors = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda name: hnp.arrays(
        dtype=DTYPES[name],
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    )
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Submit,
        request_id=ids,
        frame_name=texts,
        pixels=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3)),
        need=st.sampled_from(["latency", "accuracy"]),
        bundle_id=texts,
    ),
    st.builds(
        InferRequest,
        request_id=ids,
        bundle_id=texts,
        origin=texts,
        variant=texts,
        encoding=texts,
        deadline_ms=finite,
        tensor=tensors,
    ),
    st.builds(
        InferResult,
        request_id=ids,
        label=st.integers(0, 999),
        class_name=texts,
        confidence=finite,
        source=st.sampled_from(Source),
        served_by=texts,
        frame_name=texts,
        head_ms=finite,
        tail_ms=finite,
        bytes_sent=counts,
        bytes_received=counts,
        cache_entry=st.integers(-1, 2**40),
        cache_distance=finite,
        variant=texts,
        bundle_id=texts,
    ),
    st.builds(
        CacheCommand,
        request_id=ids,
        op=st.sampled_from(CacheOp),
        entry_id=st.integers(-1, 2**40),
        bundle_id=texts,
    ),
    st.builds(
        ErrorReply, request_id=ids, code=st.sampled_from(ErrorCode), message=texts, bundle_id=texts
    ),
    st.builds(StatusRequest, request_id=ids, bundle_id=texts),
    *(
        st.builds(
            cls,
            request_id=ids,
            bundle_id=texts,
            name=texts,
            role=st.sampled_from(["edge", "cloud"]),
            address=texts,
            load=finite,
            queue_length=counts,
            full_ms=finite,
        )
        for cls in (Ping, Pong)
    ),
    st.integers(1, 5).flatmap(
        lambda n: st.builds(
            CacheShare,
            request_id=ids,
            bundle_id=texts,
            origins=st.lists(texts, min_size=n, max_size=n),
            labels=st.lists(st.integers(0, 999), min_size=n, max_size=n),
            confidences=st.lists(finite, min_size=n, max_size=n),
            features=hnp.arrays(np.float32, (n, 8)),
        )
    ),
    st.builds(CacheSync, request_id=ids, bundle_id=texts, max_entries=counts),
    st.builds(
        StatusReply,
        request_id=ids,
        status=st.dictionaries(
            st.text(max_size=10), st.integers(-(2**63), 2**64 - 1) | texts, max_size=5
        ),
        bundle_id=texts,
    ),
)


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert other.dtype == value.dtype and other.shape == value.shape
            np.testing.assert_array_equal(other, value)
        else:
            assert other == value, name


@given(messages)
@settings(max_examples=300, deadline=None)
def test_every_message_survives_a_round_trip(message: Message) -> None:
    assert_same(decode(encode(message)), message)


@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
@settings(max_examples=500, deadline=None)
def test_garbage_frames_raise_only_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames)


@given(messages, st.data())
@settings(max_examples=500, deadline=None)
def test_corrupted_messages_decode_or_raise_protocol_error(message: Message, data: Any) -> None:
    frames = encode(message)
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    if frame:
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(frame) - 1))
            frame[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        frame = frame[: data.draw(st.integers(0, len(frame)))]
    frames[index] = bytes(frame)
    with contextlib.suppress(ProtocolError):  # the one allowed failure
        decode(frames)


@given(
    st.dictionaries(
        st.sampled_from(["v", "type", "id", "bundle", "body", "tensors", "extra"]),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**64 - 1)
            | st.floats()
            | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=8), children, max_size=4)
            ),
            max_leaves=12,
        ),
    ),
    st.lists(st.binary(max_size=64), max_size=2),
)
@settings(max_examples=500, deadline=None)
def test_well_formed_msgpack_with_wrong_fields_is_refused(
    header: dict[str, Any], tensors: list[bytes]
) -> None:
    with contextlib.suppress(ProtocolError):  # the one allowed failure
        decode([msgpack.packb(header), *tensors])


def _infer_header(**changes: Any) -> bytes:
    header = {
        "v": WIRE_VERSION,
        "type": "infer",
        "id": "r1",
        "bundle": "b",
        "body": {"origin": "cam1", "variant": "v", "encoding": "raw", "deadline_ms": 100.0},
        "tensors": [["float32", [1, 4]]],
    }
    header.update(changes)
    packed = msgpack.packb(header)
    assert isinstance(packed, bytes)
    return packed


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "empty message"),
        ([b"\xc1"], "undecodable header"),
        ([msgpack.packb([1, 2])], "not a map"),
        ([_infer_header(v=99), bytes(16)], "wire version 99"),
        ([_infer_header(type="pickle"), bytes(16)], "unknown message type"),
        ([_infer_header(tensors=[["object", [1, 4]]]), bytes(16)], "dtype 'object' not allowed"),
        ([_infer_header(tensors=[["float64", [1, 4]]]), bytes(32)], "not allowed"),
        ([_infer_header(), bytes(15)], "needs 16 bytes, frame has 15"),
        ([_infer_header(), bytes(16), bytes(16)], "2 frames follow"),
        ([_infer_header(tensors=[["uint8", [1 << 30, 1 << 30]]]), b""], "exceeds"),
        ([_infer_header(tensors=[["float32", [-1, 4]]]), bytes(16)], "bad shape"),
        ([_infer_header(tensors=[["float32", [True, 4]]]), bytes(16)], "bad shape"),
        ([_infer_header(body={"origin": "x"}), bytes(16)], "missing field 'variant'"),
        ([_infer_header(id=""), bytes(16)], "missing request id"),
        ([msgpack.packb({1: 2})], "undecodable header"),
        ([b"\x81" + b"\x91" * 100_000], "exceeds|undecodable"),
    ],
)
def test_specific_malformations_name_the_problem(frames: list[bytes], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(frames)


def test_a_role_or_need_outside_its_enum_is_refused_with_the_request_id() -> None:
    ping = {"v": WIRE_VERSION, "type": "ping", "id": "p7", "bundle": "b", "tensors": [],
            "body": {"name": "x", "role": "fog", "address": "", "load": 0.0, "queue": 0,
                     "full_ms": 1.0}}  # fmt: skip
    with pytest.raises(ProtocolError, match="role must be one of") as caught:
        decode([msgpack.packb(ping)])
    assert caught.value.request_id == "p7"
    good = {**ping, "body": {**ping["body"], "role": "cloud"}}
    decoded = decode([msgpack.packb(good)])
    assert getattr(decoded, "role", None) is Role.CLOUD


def test_non_finite_numbers_are_refused() -> None:
    body = {"origin": "a", "variant": "v", "encoding": "raw", "deadline_ms": float("nan")}
    frames = [_infer_header(body=body)]
    with pytest.raises(ProtocolError, match="not finite") as caught:
        decode([*frames, bytes(16)])
    assert caught.value.request_id == "r1"  # so the error reply can name the request


def test_unencodable_status_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(StatusReply(request_id="r", status={"x": 2**70}))
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(StatusReply(request_id="r", status={"x": object()}))


def test_oversized_tensor_is_refused_on_encode() -> None:
    big = np.zeros(MAX_TENSOR_BYTES // 4 + 1, np.float32)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(
            InferRequest(
                request_id="r",
                bundle_id="b",
                origin="o",
                variant="v",
                encoding="raw",
                deadline_ms=1,
                tensor=big,
            )
        )


def test_decoded_tensors_never_alias_a_pickle() -> None:
    # A pickle in the tensor frame is just bytes: it is read as numbers, never run.
    payload = b"\x80\x04\x95\x1a\x00cos\nsystem\n(S'touch /tmp/pwned'\ntR."
    payload += bytes(-len(payload) % 4)
    header = _infer_header(tensors=[["float32", [len(payload) // 4]]])
    message = decode([header, payload])
    assert isinstance(message, InferRequest) and message.tensor.dtype == np.float32


def test_sources_are_exactly_the_four_an_application_sees() -> None:
    assert [str(s) for s in Source] == ["cache", "local", "peer", "cloud"]
