"""The messages peers and applications exchange: one frozen dataclass per type.

What each message means and carries; how it travels (msgpack header, raw tensor
frames, every bound) is ``ccied.peer.wire``, which re-exports all of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
from ccied.peer.defaults import Need, Role


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
    need: Need = Need.LATENCY  # what the frame policy optimises for this frame
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
    role: Role
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

# What a Submit may ask the planner to optimise for (Submit.need).
NEEDS = tuple(n.value for n in Need)
