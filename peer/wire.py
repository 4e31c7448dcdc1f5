"""The wire protocol: message types and their encoding, with no sockets in it.

A message is a multipart ZeroMQ message: one msgpack header frame, then one raw
frame per tensor. The header is a map::

    {"v": WIRE_VERSION, "type": "infer", "id": "<request id>",
     "bundle": "<bundle id of the sender, '' for applications>",
     "body": {...fields of the type...},
     "tensors": [["float32", [1, 192, 7, 7]], ...]}

Decoding never unpickles, bounds every size (header bytes, string, array and
map lengths, tensor bytes, number of tensors and dimensions), accepts only the
dtypes in :data:`DTYPES`, and checks ``prod(shape) * itemsize == len(frame)``
before it looks at a buffer. Anything else raises :class:`ProtocolError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

import msgpack
import numpy as np
from ccied.peer.errors import ProtocolError

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


class MessageType(StrEnum):
    SUBMIT = "submit"
    INFER = "infer"
    RESULT = "result"
    ERROR = "error"
    STATUS = "status"
    STATUS_REPLY = "status_reply"
    CACHE = "cache"
    PING = "ping"
    PONG = "pong"
    CACHE_SHARE = "cache_share"
    CACHE_SYNC = "cache_sync"


class ErrorCode(StrEnum):
    PROTOCOL = "protocol"  # undecodable or malformed message
    BAD_FRAME = "bad_frame"  # a submitted frame is not an RGB uint8 image
    BAD_TENSOR = "bad_tensor"  # an intermediate tensor of the wrong shape or values
    BUNDLE_MISMATCH = "bundle_mismatch"  # the sender uses another model bundle
    BUSY = "busy"  # the peer's queue is full; try elsewhere or later
    UNSUPPORTED = "unsupported"  # a valid message this peer does not serve
    INTERNAL = "internal"  # a bug or resource failure on the peer


class Source(StrEnum):
    """Where an answer was computed, as seen by the application."""

    CACHE = "cache"
    LOCAL = "local"
    PEER = "peer"
    CLOUD = "cloud"


@dataclass(frozen=True, kw_only=True)
class Submit:
    """Application -> its local peer: classify one RGB uint8 frame."""

    TYPE: ClassVar[MessageType] = MessageType.SUBMIT
    request_id: str
    frame_name: str
    pixels: np.ndarray
    need: str = "latency"  # or "accuracy": what the planner optimises for this frame
    bundle_id: str = ""


@dataclass(frozen=True, kw_only=True)
class InferRequest:
    """Peer -> peer: run the tail on this intermediate tensor."""

    TYPE: ClassVar[MessageType] = MessageType.INFER
    request_id: str
    bundle_id: str
    origin: str
    variant: str  # the bundle variant (split point, channels, bits) the tensor is in
    encoding: str  # "raw" (float32 tensor) or "codec" (uint8 codec payload)
    deadline_ms: float
    tensor: np.ndarray


@dataclass(frozen=True, kw_only=True)
class InferResult:
    """The answer for one frame (peer -> peer, and peer -> application)."""

    TYPE: ClassVar[MessageType] = MessageType.RESULT
    request_id: str
    label: int
    class_name: str
    confidence: float
    source: Source
    served_by: str
    frame_name: str = ""
    head_ms: float = 0.0
    tail_ms: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    cache_entry: int = -1  # the cache entry that answered (source cache), else -1
    cache_distance: float = -1.0  # its feature distance, else -1
    variant: str = ""  # the bundle variant that crossed the network (or would have)
    bundle_id: str = ""
    cache_depth: str = ""  # the key depth that answered (source cache), else ""
    # Why the cache did not answer (a ccied.cache.MissReason), "" on a hit or without a cache.
    cache_reason: str = ""
    # A tail for another peer: ms from the decoded request to its answer there,
    # batch wait included (0 when not measured, and from peers before this field).
    served_ms: float = 0.0


class CacheOp(StrEnum):
    CLEAR = "clear"
    FORGET = "forget"


@dataclass(frozen=True, kw_only=True)
class CacheCommand:
    """Application -> its local peer: clear the cache, or forget one (wrong) entry."""

    TYPE: ClassVar[MessageType] = MessageType.CACHE
    request_id: str
    op: CacheOp
    entry_id: int = -1
    bundle_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Ping:
    """Peer -> peer heartbeat: who I am and how busy I am. Answered by a Pong."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    request_id: str
    bundle_id: str
    name: str
    role: str
    address: str  # where this peer listens for peers (tcp://IP:PORT), '' if it does not
    load: float  # requests in progress / the most this peer queues
    queue_length: int  # requests in progress
    full_ms: float  # this peer's recent whole-model compute time (EWMA; 0 if unknown)


@dataclass(frozen=True, kw_only=True)
class Pong(Ping):
    """The heartbeat answer, with the same fields about the answering peer."""

    TYPE: ClassVar[MessageType] = MessageType.PONG


@dataclass(frozen=True, kw_only=True)
class CacheShare:
    """Peer -> peer: cache entries learned elsewhere (features as one (N, dim) float32 tensor)."""

    TYPE: ClassVar[MessageType] = MessageType.CACHE_SHARE
    request_id: str
    bundle_id: str
    origins: list[str]
    labels: list[int]
    confidences: list[float]
    features: np.ndarray
    # The key depth of the features ("thumb16", "blocks.4"); "" from older
    # peers: the receiver matches the feature dimension.
    depth: str = ""


@dataclass(frozen=True, kw_only=True)
class CacheSync:
    """Peer -> peer: send me up to ``max_entries`` of your hottest entries (a CacheShare)."""

    TYPE: ClassVar[MessageType] = MessageType.CACHE_SYNC
    request_id: str
    bundle_id: str
    max_entries: int
    depth: str = ""  # the key depth wanted ("": the sender's first)


@dataclass(frozen=True, kw_only=True)
class ErrorReply:
    TYPE: ClassVar[MessageType] = MessageType.ERROR
    request_id: str
    code: ErrorCode
    message: str
    bundle_id: str = ""


@dataclass(frozen=True, kw_only=True)
class StatusRequest:
    TYPE: ClassVar[MessageType] = MessageType.STATUS
    request_id: str
    bundle_id: str = ""


@dataclass(frozen=True, kw_only=True)
class StatusReply:
    TYPE: ClassVar[MessageType] = MessageType.STATUS_REPLY
    request_id: str
    status: dict[str, Any] = field(default_factory=dict)
    bundle_id: str = ""


Message = (
    Submit
    | InferRequest
    | InferResult
    | ErrorReply
    | StatusRequest
    | StatusReply
    | CacheCommand
    | Ping
    | Pong
    | CacheShare
    | CacheSync
)

NEEDS = ("latency", "accuracy")

# Entries in one CacheShare message (batching bounds both size and count).
MAX_SHARED_ENTRIES = 256


class WireCodec(Protocol):
    """What socket code needs of a codec: frames out, a message back."""

    def encode(self, message: Message) -> list[bytes]: ...

    def decode(self, frames: Sequence[bytes]) -> Message: ...


class MsgpackCodec:
    """The msgpack header + raw tensor frames encoding described above."""

    def encode(self, message: Message) -> list[bytes]:
        body: dict[str, Any]
        tensors: list[np.ndarray] = []
        match message:
            case Submit():
                body = {"frame": message.frame_name, "need": message.need}
                tensors = [message.pixels]
            case InferRequest():
                body = {
                    "origin": message.origin,
                    "variant": message.variant,
                    "encoding": message.encoding,
                    "deadline_ms": float(message.deadline_ms),
                }
                tensors = [message.tensor]
            case InferResult():
                body = {
                    "label": int(message.label),
                    "class_name": message.class_name,
                    "confidence": float(message.confidence),
                    "source": str(message.source),
                    "served_by": message.served_by,
                    "frame": message.frame_name,
                    "head_ms": float(message.head_ms),
                    "tail_ms": float(message.tail_ms),
                    "bytes_sent": int(message.bytes_sent),
                    "bytes_received": int(message.bytes_received),
                    "cache_entry": int(message.cache_entry),
                    "cache_distance": float(message.cache_distance),
                    "variant": message.variant,
                    "cache_depth": message.cache_depth,
                    "cache_reason": message.cache_reason,
                    "served_ms": float(message.served_ms),
                }
            case ErrorReply():
                body = {"code": str(message.code), "message": message.message}
            case StatusRequest():
                body = {}
            case StatusReply():
                body = {"status": message.status}
            case CacheCommand():
                body = {"op": str(message.op), "entry": int(message.entry_id)}
            case Ping():  # Pong too: same fields
                body = {
                    "name": message.name,
                    "role": message.role,
                    "address": message.address,
                    "load": float(message.load),
                    "queue": int(message.queue_length),
                    "full_ms": float(message.full_ms),
                }
            case CacheShare():
                body = {
                    "origins": list(message.origins),
                    "labels": [int(x) for x in message.labels],
                    "confidences": [float(x) for x in message.confidences],
                    "depth": message.depth,
                }
                tensors = [message.features]
            case CacheSync():
                body = {"max": int(message.max_entries), "depth": message.depth}
        descriptors = []
        buffers = []
        for tensor in tensors:
            name = _dtype_name(tensor.dtype)
            array = np.ascontiguousarray(tensor, dtype=DTYPES[name])
            if array.nbytes > MAX_TENSOR_BYTES:
                raise ProtocolError(
                    f"tensor of {array.nbytes} bytes exceeds the {MAX_TENSOR_BYTES} byte limit",
                    message.request_id,
                )
            descriptors.append([name, list(array.shape)])
            buffers.append(array.tobytes())
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


def _dtype_name(dtype: np.dtype[Any]) -> str:
    for name, allowed in DTYPES.items():
        if dtype.kind == allowed.kind and dtype.itemsize == allowed.itemsize:
            return name
    raise ProtocolError(f"dtype {dtype} cannot travel on the wire; allowed: {sorted(DTYPES)}")


def _get(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], request_id: str) -> Any:
    if key not in mapping:
        raise ProtocolError(f"missing field {key!r}", request_id)
    value = mapping[key]
    # bool is an int subclass; never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(f"field {key!r} has type bool", request_id)
    if not isinstance(value, kind):
        raise ProtocolError(f"field {key!r} has type {type(value).__name__}", request_id)
    return value


def _finite(value: float, key: str, request_id: str) -> float:
    if not math.isfinite(value):
        raise ProtocolError(f"field {key!r} is not finite", request_id)
    return float(value)


def _tensors(header: dict[str, Any], frames: Sequence[bytes], request_id: str) -> list[np.ndarray]:
    descriptors = _get(header, "tensors", list, request_id)
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
    version = _get(header, "v", int, request_id)
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version}, this peer speaks {WIRE_VERSION}", request_id)
    try:
        kind = MessageType(_get(header, "type", str, request_id))
    except ValueError as exc:
        raise ProtocolError(f"unknown message type {header.get('type')!r}", request_id) from exc
    # Only an error reply may lack an id: the one answering an unreadable message.
    if not request_id and kind is not MessageType.ERROR:
        raise ProtocolError("missing request id")
    bundle_id = _get(header, "bundle", str, request_id)
    body = _get(header, "body", dict, request_id)
    tensors = _tensors(header, frames, request_id)
    with_tensor = (MessageType.SUBMIT, MessageType.INFER, MessageType.CACHE_SHARE)
    expected_tensors = 1 if kind in with_tensor else 0
    if len(tensors) != expected_tensors:
        raise ProtocolError(
            f"{kind} carries {expected_tensors} tensors, got {len(tensors)}", request_id
        )

    def text(key: str) -> str:
        value: str = _get(body, key, str, request_id)
        return value

    def optional_text(key: str) -> str:
        # Fields added after wire version 1 shipped: absent from older peers.
        return text(key) if key in body else ""

    def number(key: str) -> float:
        return _finite(_get(body, key, (int, float), request_id), key, request_id)

    def count(key: str) -> int:
        value: int = _get(body, key, int, request_id)
        if value < 0:
            raise ProtocolError(f"field {key!r} is negative", request_id)
        return value

    match kind:
        case MessageType.SUBMIT:
            return Submit(
                request_id=request_id,
                bundle_id=bundle_id,
                frame_name=text("frame"),
                need=_need(text("need"), request_id),
                pixels=tensors[0],
            )
        case MessageType.INFER:
            return InferRequest(
                request_id=request_id,
                bundle_id=bundle_id,
                origin=text("origin"),
                variant=text("variant"),
                encoding=text("encoding"),
                deadline_ms=number("deadline_ms"),
                tensor=tensors[0],
            )
        case MessageType.RESULT:
            try:
                source = Source(text("source"))
            except ValueError as exc:
                raise ProtocolError(f"unknown source {body.get('source')!r}", request_id) from exc
            return InferResult(
                request_id=request_id,
                bundle_id=bundle_id,
                label=count("label"),
                class_name=text("class_name"),
                confidence=number("confidence"),
                source=source,
                served_by=text("served_by"),
                frame_name=text("frame"),
                head_ms=number("head_ms"),
                tail_ms=number("tail_ms"),
                bytes_sent=count("bytes_sent"),
                bytes_received=count("bytes_received"),
                cache_entry=_get(body, "cache_entry", int, request_id),
                cache_distance=number("cache_distance"),
                variant=text("variant"),
                cache_depth=optional_text("cache_depth"),
                cache_reason=optional_text("cache_reason"),
                served_ms=number("served_ms") if "served_ms" in body else 0.0,
            )
        case MessageType.ERROR:
            try:
                code = ErrorCode(text("code"))
            except ValueError as exc:
                raise ProtocolError(f"unknown error code {body.get('code')!r}", request_id) from exc
            return ErrorReply(
                request_id=request_id, bundle_id=bundle_id, code=code, message=text("message")
            )
        case MessageType.STATUS:
            return StatusRequest(request_id=request_id, bundle_id=bundle_id)
        case MessageType.CACHE:
            try:
                op = CacheOp(text("op"))
            except ValueError as exc:
                raise ProtocolError(f"unknown cache op {body.get('op')!r}", request_id) from exc
            return CacheCommand(
                request_id=request_id,
                bundle_id=bundle_id,
                op=op,
                entry_id=_get(body, "entry", int, request_id),
            )
        case MessageType.PING | MessageType.PONG:
            cls = Ping if kind is MessageType.PING else Pong
            return cls(
                request_id=request_id,
                bundle_id=bundle_id,
                name=text("name"),
                role=text("role"),
                address=text("address"),
                load=number("load"),
                queue_length=count("queue"),
                full_ms=number("full_ms"),
            )
        case MessageType.CACHE_SHARE:
            origins = _get(body, "origins", list, request_id)
            labels = _get(body, "labels", list, request_id)
            confidences = _get(body, "confidences", list, request_id)
            features = tensors[0]
            n = len(labels)
            if not (len(origins) == len(confidences) == n <= MAX_SHARED_ENTRIES):
                raise ProtocolError(
                    "cache share lists differ in length or are too long", request_id
                )
            if features.ndim != 2 or features.shape[0] != n or features.dtype != np.float32:
                raise ProtocolError("cache share features must be (N, dim) float32", request_id)
            if not all(isinstance(o, str) for o in origins):
                raise ProtocolError("cache share origins must be strings", request_id)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
                raise ProtocolError("cache share labels must be integers", request_id)
            if not all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in confidences
            ):
                raise ProtocolError("cache share confidences must be finite numbers", request_id)
            return CacheShare(
                request_id=request_id,
                bundle_id=bundle_id,
                origins=origins,
                labels=labels,
                confidences=[float(x) for x in confidences],
                features=features,
                depth=optional_text("depth"),
            )
        case MessageType.CACHE_SYNC:
            return CacheSync(
                request_id=request_id,
                bundle_id=bundle_id,
                max_entries=count("max"),
                depth=optional_text("depth"),
            )
        case MessageType.STATUS_REPLY:
            return StatusReply(
                request_id=request_id,
                bundle_id=bundle_id,
                status=_get(body, "status", dict, request_id),
            )
    raise ProtocolError(f"unhandled message type {kind}", request_id)  # pragma: no cover


def _need(value: str, request_id: str) -> str:
    if value not in NEEDS:
        raise ProtocolError(f"need must be one of {NEEDS}, got {value!r}", request_id)
    return value


def message_bytes(frames: Sequence[bytes]) -> int:
    """Bytes a message occupies on the wire (frame payloads; framing overhead aside)."""
    return sum(len(frame) for frame in frames)
