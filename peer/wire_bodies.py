"""Each message type's body on the wire: one encoder and one parser per type.

An encoder gives a message's body map and its tensors; a parser builds the
message from a :class:`Body`, whose every read checks the field's type and range
and raises :class:`ProtocolError` with the request id. ``ccied.peer.wire`` owns
the header, the tensor frames and their bounds, and finds these by type in
:data:`ENCODERS` and :data:`PARSERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np
from ccied.peer.defaults import Need, Role
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

# Entries in one CacheShare message (batching bounds both size and count).
MAX_SHARED_ENTRIES = 256


# -- encoding: a message's body and its tensors ------------------------------------

Encoded = tuple[dict[str, Any], list[np.ndarray]]


def _encode_submit(message: Submit) -> Encoded:
    return {"frame": message.frame_name, "need": str(message.need)}, [message.pixels]


def _encode_infer(message: InferRequest) -> Encoded:
    body = {
        "origin": message.origin,
        "variant": message.variant,
        "encoding": message.encoding,
        "deadline_ms": float(message.deadline_ms),
    }
    return body, [message.tensor]


def _encode_result(message: InferResult) -> Encoded:
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
    return body, []


def _encode_error(message: ErrorReply) -> Encoded:
    return {"code": str(message.code), "message": message.message}, []


def _encode_status(message: StatusRequest) -> Encoded:
    return {}, []


def _encode_status_reply(message: StatusReply) -> Encoded:
    return {"status": message.status}, []


def _encode_cache(message: CacheCommand) -> Encoded:
    return {"op": str(message.op), "entry": int(message.entry_id)}, []


def _encode_ping(message: Ping) -> Encoded:  # Pong too: same fields
    body = {
        "name": message.name,
        "role": str(message.role),
        "address": message.address,
        "load": float(message.load),
        "queue": int(message.queue_length),
        "full_ms": float(message.full_ms),
    }
    return body, []


def _encode_cache_share(message: CacheShare) -> Encoded:
    body = {
        "origins": list(message.origins),
        "labels": [int(x) for x in message.labels],
        "confidences": [float(x) for x in message.confidences],
        "depth": message.depth,
    }
    return body, [message.features]


def _encode_cache_sync(message: CacheSync) -> Encoded:
    return {"max": int(message.max_entries), "depth": message.depth}, []


ENCODERS: dict[MessageType, Callable[[Any], Encoded]] = {
    MessageType.SUBMIT: _encode_submit,
    MessageType.INFER: _encode_infer,
    MessageType.RESULT: _encode_result,
    MessageType.ERROR: _encode_error,
    MessageType.STATUS: _encode_status,
    MessageType.STATUS_REPLY: _encode_status_reply,
    MessageType.CACHE: _encode_cache,
    MessageType.PING: _encode_ping,
    MessageType.PONG: _encode_ping,
    MessageType.CACHE_SHARE: _encode_cache_share,
    MessageType.CACHE_SYNC: _encode_cache_sync,
}


# -- decoding: a checked body to its message ------------------------------------------


def checked_field(
    mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], request_id: str
) -> Any:
    """``mapping[key]`` if it is a ``kind`` (never a bool for a number), else ProtocolError."""
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


_Enum = TypeVar("_Enum", bound=StrEnum)


class Body:
    """A decoded message's body: each field read is checked for type and range."""

    def __init__(
        self, fields: dict[str, Any], request_id: str, bundle_id: str, tensors: list[np.ndarray]
    ) -> None:
        self.fields = fields
        self.request_id = request_id
        self.bundle_id = bundle_id
        self.tensors = tensors

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        return checked_field(self.fields, key, kind, self.request_id)

    def text(self, key: str) -> str:
        value: str = self.get(key, str)
        return value

    def optional_text(self, key: str) -> str:
        # Fields added after wire version 1 shipped: absent from older peers.
        return self.text(key) if key in self.fields else ""

    def number(self, key: str) -> float:
        return _finite(self.get(key, (int, float)), key, self.request_id)

    def count(self, key: str) -> int:
        value: int = self.get(key, int)
        if value < 0:
            raise ProtocolError(f"field {key!r} is negative", self.request_id)
        return value

    def choice(self, key: str, kind: type[_Enum], what: str) -> _Enum:
        """The field as a member of ``kind``; ``what`` names it in the error."""
        try:
            return kind(self.text(key))
        except ValueError as exc:
            raise ProtocolError(
                f"unknown {what} {self.fields.get(key)!r}", self.request_id
            ) from exc


def _parse_submit(body: Body) -> Submit:
    return Submit(
        request_id=body.request_id,
        bundle_id=body.bundle_id,
        frame_name=body.text("frame"),
        need=_need(body.text("need"), body.request_id),
        pixels=body.tensors[0],
    )


def _parse_infer(body: Body) -> InferRequest:
    return InferRequest(
        request_id=body.request_id,
        bundle_id=body.bundle_id,
        origin=body.text("origin"),
        variant=body.text("variant"),
        encoding=body.text("encoding"),
        deadline_ms=body.number("deadline_ms"),
        tensor=body.tensors[0],
    )


def _parse_result(body: Body) -> InferResult:
    source = body.choice("source", Source, "source")
    return InferResult(
        request_id=body.request_id,
        bundle_id=body.bundle_id,
        label=body.count("label"),
        class_name=body.text("class_name"),
        confidence=body.number("confidence"),
        source=source,
        served_by=body.text("served_by"),
        frame_name=body.text("frame"),
        head_ms=body.number("head_ms"),
        tail_ms=body.number("tail_ms"),
        bytes_sent=body.count("bytes_sent"),
        bytes_received=body.count("bytes_received"),
        cache_entry=body.get("cache_entry", int),
        cache_distance=body.number("cache_distance"),
        variant=body.text("variant"),
        cache_depth=body.optional_text("cache_depth"),
        cache_reason=body.optional_text("cache_reason"),
        served_ms=body.number("served_ms") if "served_ms" in body.fields else 0.0,
    )


def _parse_error(body: Body) -> ErrorReply:
    code = body.choice("code", ErrorCode, "error code")
    return ErrorReply(
        request_id=body.request_id,
        bundle_id=body.bundle_id,
        code=code,
        message=body.text("message"),
    )


def _parse_status(body: Body) -> StatusRequest:
    return StatusRequest(request_id=body.request_id, bundle_id=body.bundle_id)


def _parse_status_reply(body: Body) -> StatusReply:
    return StatusReply(
        request_id=body.request_id, bundle_id=body.bundle_id, status=body.get("status", dict)
    )


def _parse_cache(body: Body) -> CacheCommand:
    op = body.choice("op", CacheOp, "cache op")
    return CacheCommand(
        request_id=body.request_id,
        bundle_id=body.bundle_id,
        op=op,
        entry_id=body.get("entry", int),
    )


def _parse_ping(body: Body, cls: type[Ping] = Ping) -> Ping:
    return cls(
        request_id=body.request_id,
        bundle_id=body.bundle_id,
        name=body.text("name"),
        role=_role(body.text("role"), body.request_id),
        address=body.text("address"),
        load=body.number("load"),
        queue_length=body.count("queue"),
        full_ms=body.number("full_ms"),
    )


def _parse_pong(body: Body) -> Ping:
    return _parse_ping(body, Pong)


def _parse_cache_share(body: Body) -> CacheShare:
    request_id = body.request_id
    origins = body.get("origins", list)
    labels = body.get("labels", list)
    confidences = body.get("confidences", list)
    features = body.tensors[0]
    n = len(labels)
    if not (len(origins) == len(confidences) == n <= MAX_SHARED_ENTRIES):
        raise ProtocolError("cache share lists differ in length or are too long", request_id)
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
        bundle_id=body.bundle_id,
        origins=origins,
        labels=labels,
        confidences=[float(x) for x in confidences],
        features=features,
        depth=body.optional_text("depth"),
    )


def _parse_cache_sync(body: Body) -> CacheSync:
    return CacheSync(
        request_id=body.request_id,
        bundle_id=body.bundle_id,
        max_entries=body.count("max"),
        depth=body.optional_text("depth"),
    )


PARSERS: dict[MessageType, Callable[[Body], Message]] = {
    MessageType.SUBMIT: _parse_submit,
    MessageType.INFER: _parse_infer,
    MessageType.RESULT: _parse_result,
    MessageType.ERROR: _parse_error,
    MessageType.STATUS: _parse_status,
    MessageType.STATUS_REPLY: _parse_status_reply,
    MessageType.CACHE: _parse_cache,
    MessageType.PING: _parse_ping,
    MessageType.PONG: _parse_pong,
    MessageType.CACHE_SHARE: _parse_cache_share,
    MessageType.CACHE_SYNC: _parse_cache_sync,
}


def _role(value: str, request_id: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = tuple(r.value for r in Role)
        raise ProtocolError(f"role must be one of {roles}, got {value!r}", request_id) from None


def _need(value: str, request_id: str) -> Need:
    if value not in NEEDS:
        raise ProtocolError(f"need must be one of {NEEDS}, got {value!r}", request_id)
    return Need(value)
