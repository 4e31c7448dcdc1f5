"""The wire protocol: how a message travels as frames, with no sockets in it.

A message is a multipart ZeroMQ message: one msgpack header frame, then one raw
frame per tensor. The header is a map::

    {"v": WIRE_VERSION, "type": "infer", "id": "<request id>",
     "bundle": "<bundle id of the sender, '' for applications>",
     "body": {...fields of the type...},
     "tensors": [["float32", [1, 192, 7, 7]], ...]}

Decoding never unpickles, bounds every size (header bytes, string, array and
map lengths, tensor bytes, number of tensors and dimensions), accepts only the
dtypes in :data:`DTYPES`, and checks ``prod(shape) * itemsize == len(frame)``
before it looks at a buffer. Anything else raises :class:`ProtocolError`, which
carries the request id whenever the header had one.

The message types are in ``ccied.peer.messages`` and re-exported here. Each has
one small encoder (its body and tensors) and one small parser (its fields from a
checked body), in ``ccied.peer.wire_bodies``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import msgpack
import numpy as np
from ccied.peer.errors import ProtocolError
from ccied.peer.messages import (
    NEEDS,
    CacheCommand,
    CacheOp,
    CacheShare,
    CacheSync,
    ErrorCode,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    MessageType,
    Ping,
    Pong,
    Source,
    StatusReply,
    StatusRequest,
    Submit,
)
from ccied.peer.wire_bodies import ENCODERS, MAX_SHARED_ENTRIES, PARSERS, Body, checked_field

__all__ = [
    "DEFAULT_CODEC",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_NDIM",
    "MAX_SHARED_ENTRIES",
    "MAX_STRING_LENGTH",
    "MAX_TENSORS",
    "MAX_TENSOR_BYTES",
    "NEEDS",
    "WIRE_VERSION",
    "CacheCommand",
    "CacheOp",
    "CacheShare",
    "CacheSync",
    "ErrorCode",
    "ErrorReply",
    "InferRequest",
    "InferResult",
    "Message",
    "MessageType",
    "MsgpackCodec",
    "Ping",
    "Pong",
    "Source",
    "StatusReply",
    "StatusRequest",
    "Submit",
    "WireCodec",
    "decode",
    "encode",
    "message_bytes",
]

WIRE_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 4
MAX_NDIM = 6
MAX_STRING_LENGTH = 4096
# A whole message can be no larger than this; sockets enforce it too (ZMQ_MAXMSGSIZE).
MAX_MESSAGE_BYTES = MAX_HEADER_BYTES + MAX_TENSORS * MAX_TENSOR_BYTES

# Explicit little-endian dtypes: the bytes mean the same on every peer.
DTYPES: dict[str, np.dtype[Any]] = {
    "uint8": np.dtype("<u1"),
    "int8": np.dtype("<i1"),
    "uint16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}


class WireCodec(Protocol):
    """What socket code needs of a codec: frames out, a message back."""

    def encode(self, message: Message) -> list[bytes]: ...

    def decode(self, frames: Sequence[bytes]) -> Message: ...


class MsgpackCodec:
    """The msgpack header + raw tensor frames encoding described above."""

    def encode(self, message: Message) -> list[bytes]:
        body, tensors = ENCODERS[message.TYPE](message)
        descriptors, buffers = _tensor_frames(tensors, message.request_id)
        header = {
            "v": WIRE_VERSION,
            "type": str(message.TYPE),
            "id": message.request_id,
            "bundle": message.bundle_id,
            "body": body,
            "tensors": descriptors,
        }
        try:
            packed = msgpack.packb(header, use_bin_type=True)
        except (OverflowError, TypeError, ValueError) as exc:
            # A status value msgpack cannot carry (a 65-bit int, an object): the
            # sender's bug, reported as a protocol error instead of a crash.
            raise ProtocolError(f"cannot encode {message.TYPE}: {exc}", message.request_id) from exc
        assert isinstance(packed, bytes)
        if len(packed) > MAX_HEADER_BYTES:
            raise ProtocolError(
                f"header of {len(packed)} bytes exceeds the limit", message.request_id
            )
        return [packed, *buffers]

    def decode(self, frames: Sequence[bytes]) -> Message:
        if not frames:
            raise ProtocolError("empty message")
        raw_header = frames[0]
        if len(raw_header) > MAX_HEADER_BYTES:
            raise ProtocolError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            header = msgpack.unpackb(
                raw_header,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=MAX_STRING_LENGTH,
                max_bin_len=0,
                max_array_len=256,
                max_map_len=256,
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
            # msgpack raises ValueError subclasses for limits and bad data,
            # TypeError for unhashable map keys, RecursionError for deep nests.
            raise ProtocolError(f"undecodable header: {exc}") from exc
        if not isinstance(header, dict):
            raise ProtocolError("header is not a map")
        request_id = header.get("id")
        request_id = request_id if isinstance(request_id, str) else ""
        try:
            return _parse(header, frames[1:], request_id)
        except ProtocolError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed message: {exc!r}", request_id) from exc


DEFAULT_CODEC = MsgpackCodec()


def encode(message: Message) -> list[bytes]:
    """Encode with the default codec."""
    return DEFAULT_CODEC.encode(message)


def decode(frames: Sequence[bytes]) -> Message:
    """Decode with the default codec; ProtocolError on anything malformed."""
    return DEFAULT_CODEC.decode(frames)


def _tensor_frames(
    tensors: list[np.ndarray], request_id: str
) -> tuple[list[list[Any]], list[bytes]]:
    """Each tensor's [dtype, shape] descriptor and its raw little-endian bytes."""
    descriptors = []
    buffers = []
    for tensor in tensors:
        name = _dtype_name(tensor.dtype)
        array = np.ascontiguousarray(tensor, dtype=DTYPES[name])
        if array.nbytes > MAX_TENSOR_BYTES:
            raise ProtocolError(
                f"tensor of {array.nbytes} bytes exceeds the {MAX_TENSOR_BYTES} byte limit",
                request_id,
            )
        descriptors.append([name, list(array.shape)])
        buffers.append(array.tobytes())
    return descriptors, buffers


def _dtype_name(dtype: np.dtype[Any]) -> str:
    for name, allowed in DTYPES.items():
        if dtype.kind == allowed.kind and dtype.itemsize == allowed.itemsize:
            return name
    raise ProtocolError(f"dtype {dtype} cannot travel on the wire; allowed: {sorted(DTYPES)}")


# -- decoding: the header and tensors checked here, then the body by its type --------


def _tensors(header: dict[str, Any], frames: Sequence[bytes], request_id: str) -> list[np.ndarray]:
    descriptors = checked_field(header, "tensors", list, request_id)
    if len(descriptors) > MAX_TENSORS:
        raise ProtocolError(
            f"{len(descriptors)} tensors exceed the limit {MAX_TENSORS}", request_id
        )
    if len(descriptors) != len(frames):
        raise ProtocolError(
            f"header names {len(descriptors)} tensors but {len(frames)} frames follow", request_id
        )
    tensors = []
    for descriptor, frame in zip(descriptors, frames, strict=True):
        if not (isinstance(descriptor, list) and len(descriptor) == 2):
            raise ProtocolError("tensor descriptor must be [dtype, shape]", request_id)
        name, shape = descriptor
        if not isinstance(name, str) or name not in DTYPES:
            raise ProtocolError(
                f"dtype {name!r} not allowed; allowed: {sorted(DTYPES)}", request_id
            )
        if not isinstance(shape, list) or not 0 < len(shape) <= MAX_NDIM:
            raise ProtocolError(f"shape must be a list of 1..{MAX_NDIM} sizes", request_id)
        if not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 30 for d in shape
        ):
            raise ProtocolError(f"bad shape {shape!r}", request_id)
        dtype = DTYPES[name]
        expected = math.prod(shape) * dtype.itemsize
        if expected > MAX_TENSOR_BYTES:
            raise ProtocolError(
                f"tensor of {expected} bytes exceeds {MAX_TENSOR_BYTES}", request_id
            )
        if expected != len(frame):
            raise ProtocolError(
                f"tensor {name}{shape} needs {expected} bytes, frame has {len(frame)}", request_id
            )
        tensors.append(np.frombuffer(frame, dtype=dtype).reshape(shape))
    return tensors


def _parse(header: dict[str, Any], frames: Sequence[bytes], request_id: str) -> Message:
    version = checked_field(header, "v", int, request_id)
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version}, this peer speaks {WIRE_VERSION}", request_id)
    try:
        kind = MessageType(checked_field(header, "type", str, request_id))
    except ValueError as exc:
        raise ProtocolError(f"unknown message type {header.get('type')!r}", request_id) from exc
    # Only an error reply may lack an id: the one answering an unreadable message.
    if not request_id and kind is not MessageType.ERROR:
        raise ProtocolError("missing request id")
    bundle_id = checked_field(header, "bundle", str, request_id)
    body = checked_field(header, "body", dict, request_id)
    tensors = _tensors(header, frames, request_id)
    with_tensor = (MessageType.SUBMIT, MessageType.INFER, MessageType.CACHE_SHARE)
    expected_tensors = 1 if kind in with_tensor else 0
    if len(tensors) != expected_tensors:
        raise ProtocolError(
            f"{kind} carries {expected_tensors} tensors, got {len(tensors)}", request_id
        )
    return PARSERS[kind](Body(body, request_id, bundle_id, tensors))


def message_bytes(frames: Sequence[bytes]) -> int:
    """Bytes a message occupies on the wire (frame payloads; framing overhead aside)."""
    return sum(len(frame) for frame in frames)
