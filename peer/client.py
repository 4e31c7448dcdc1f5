"""``ccied.Client``: what an application uses to talk to its local peer.

Example::

    from ccied import Client
    with Client() as client:            # the local peer's default socket
        result = client.submit(rgb_uint8_frame, frame_name="cam0#17")
        print(result.class_name, result.source, result.latency_ms)
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from ccied.peer.defaults import Need
from ccied.peer.errors import PeerUnavailableError, ProtocolError, RequestFailedError
from ccied.peer.paths import default_socket_path, runtime_dir
from ccied.peer.wire import (
    CacheCommand,
    CacheOp,
    ErrorReply,
    InferResult,
    Message,
    MsgpackCodec,
    StatusReply,
    StatusRequest,
    Submit,
    WireCodec,
)

DEFAULT_TIMEOUT_S = 30.0
# The peer refuses a frame with a side over this (ccied.pruning.media.MAX_FRAME_SIDE,
# not imported: that module loads torch, and the client stays light).
MAX_SENT_SIDE = 4096
# A frame over MAX_SENT_SIDE is resized to this short side before it is sent. The
# model sees the centre of the short side resized to 256 pixels, and from 1080 the
# answer stays that of the full frame: 19 scikit-image photos, bikes and
# bigbuckbunny frames blown up to a 4500 and a 6000 pixel long side (2026-11-30)
# gave 224 x 224 crops 0.1 grey levels apart on average (2 at most), top-1 confidence
# within 0.03, the same top-1 on every decisive frame and on 36 of 38 (two guesses
# flipped, as a 2-pixel shift flips them); a 512 short side: 0.45 apart, 34 of 38.
DOWNSCALED_SHORT_SIDE = 1080


@dataclass(frozen=True)
class FrameResult:
    """One frame's answer as the application sees it (``ccied submit --json`` prints it)."""

    frame: str
    label: int
    class_name: str
    confidence: float
    source: str  # cache | local | peer | cloud
    served_by: str
    latency_ms: float  # submit to answer, measured by the client
    bytes_sent: int  # bytes this frame put on the network (all attempts)
    bytes_received: int
    head_ms: float
    tail_ms: float
    cache_entry: int  # the entry that answered (source cache), else -1
    cache_distance: float  # its distance to this frame's feature, else -1
    variant: str  # the bundle variant sent (or that would have been)
    cache_depth: str = ""  # the key depth that answered (source cache), else ""
    # Why the cache did not answer: no_neighbour, not_decisive, disagree, skipped,
    # no_key, empty ("" on a hit or without a cache).
    cache_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_frame(pixels: np.ndarray) -> np.ndarray:
    """The frame as :meth:`Client.submit` sends it: one the peer would refuse as too big, made fit.

    A frame the peer accepts goes as it is, so its answer does not change (a
    resize here costs more than the peer saves: 26 ms to bring 1280 x 720 to
    a 512 short side, against 15 ms for the peer's own resize to 256). An RGB
    uint8 frame with a side over MAX_SENT_SIDE (5000 x 5000 would also exceed
    the 64 MiB the wire carries) is resized (Lanczos) to a short side of
    DOWNSCALED_SHORT_SIDE, and its long side cropped to its middle
    MAX_SENT_SIDE pixels if still longer: the model sees only the centre.
    Anything that is not an RGB uint8 frame goes as it is, for the peer to
    refuse with its reason.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return pixels
    height, width = pixels.shape[:2]
    if max(height, width) <= MAX_SENT_SIDE:
        return pixels
    short = min(height, width)
    if short > DOWNSCALED_SHORT_SIDE:
        from PIL import Image  # for oversized frames only: `import ccied` stays light

        scale = DOWNSCALED_SHORT_SIDE / short
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if height <= width:
            size = (size[0], DOWNSCALED_SHORT_SIDE)
        else:
            size = (DOWNSCALED_SHORT_SIDE, size[1])
        image = Image.fromarray(np.ascontiguousarray(pixels))
        pixels = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)
        height, width = pixels.shape[:2]
    top = max(0, (height - MAX_SENT_SIDE) // 2)
    left = max(0, (width - MAX_SENT_SIDE) // 2)
    return np.ascontiguousarray(pixels[top : top + MAX_SENT_SIDE, left : left + MAX_SENT_SIDE])


def find_socket(name: str | None = None) -> Path:
    """The socket of the local peer: by name, or the only one in the runtime folder."""
    if name:
        return default_socket_path(name)
    folder = runtime_dir()
    sockets = sorted(folder.glob("*.sock")) if folder.is_dir() else []
    if len(sockets) == 1:
        return sockets[0]
    hostname = default_socket_path(os.uname().nodename)
    if hostname in sockets or not sockets:
        return hostname
    names = ", ".join(s.name for s in sockets)
    raise PeerUnavailableError(f"several peers run here ({names}); choose one with --socket")


class Client:
    """A blocking client of the local peer over its Unix socket (ZeroMQ DEALER)."""

    def __init__(
        self,
        socket_path: Path | str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        codec: WireCodec | None = None,
        on_stray_reply: Callable[[Message], None] | None = None,
    ) -> None:
        """``on_stray_reply`` sees every reply that does not answer the request in
        progress (a late answer to a request given up on, or a second answer to
        one), which are otherwise dropped: a caller that counts answers per
        request id needs them (``ccied bench chaos``)."""
        self.socket_path = Path(socket_path) if socket_path else find_socket()
        self.timeout_s = timeout_s
        self.on_stray_reply = on_stray_reply
        self._codec = codec or MsgpackCodec()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(f"ipc://{self.socket_path}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()

    def _exchange(self, request: Message, timeout_s: float | None = None) -> Message:
        if not self.socket_path.exists():
            raise PeerUnavailableError(
                f"no peer at {self.socket_path} (is `ccied peer` running? see --socket)"
            )
        budget_s = self.timeout_s if timeout_s is None else timeout_s
        self._socket.send_multipart(self._codec.encode(request))
        deadline = time.monotonic() + budget_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1e3)
            if left_ms <= 0 or not self._socket.poll(left_ms):
                raise PeerUnavailableError(
                    f"no answer from the peer at {self.socket_path} within {budget_s:.1f} s"
                )
            frames = self._socket.recv_multipart()
            try:
                reply = self._codec.decode(frames)
            except ProtocolError as exc:
                raise PeerUnavailableError(f"undecodable reply from the peer: {exc}") from exc
            if reply.request_id != request.request_id:
                # The late answer to an earlier request that timed out.
                if self.on_stray_reply is not None:
                    self.on_stray_reply(reply)
                continue
            if isinstance(reply, ErrorReply):
                raise RequestFailedError(str(reply.code), reply.message)
            return reply

    def submit(
        self,
        pixels: np.ndarray,
        frame_name: str = "",
        need: Need | str = Need.LATENCY,
        request_id: str | None = None,
    ) -> FrameResult:
        """Classify one RGB uint8 frame of shape (height, width, 3).

        ``need``: "latency" (the fastest variant above the fidelity floor) or
        "accuracy" (the most faithful variant of the peer's bundle).
        ``request_id``: a fresh one by default; a caller that resubmits a frame
        after a timeout passes the same id, so answers can be matched to frames.
        A frame bigger than the peer takes is made to fit first (:func:`fit_frame`).
        """
        start = time.perf_counter()
        request = Submit(
            request_id=request_id or uuid.uuid4().hex,
            frame_name=frame_name,
            pixels=fit_frame(pixels),
            need=_need(need),
        )
        reply = self._exchange(request)
        latency_ms = (time.perf_counter() - start) * 1e3
        if not isinstance(reply, InferResult):
            raise PeerUnavailableError(f"unexpected {reply.TYPE} reply to a frame")
        return FrameResult(
            frame=frame_name,
            label=reply.label,
            class_name=reply.class_name,
            confidence=reply.confidence,
            source=str(reply.source),
            served_by=reply.served_by,
            latency_ms=latency_ms,
            bytes_sent=reply.bytes_sent,
            bytes_received=reply.bytes_received,
            head_ms=reply.head_ms,
            tail_ms=reply.tail_ms,
            cache_entry=reply.cache_entry,
            cache_distance=reply.cache_distance,
            variant=reply.variant,
            cache_depth=reply.cache_depth,
            cache_reason=reply.cache_reason,
        )

    def status(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The peer's identity, bundle, targets and counters."""
        reply = self._exchange(StatusRequest(request_id=uuid.uuid4().hex), timeout_s)
        if not isinstance(reply, StatusReply):
            raise PeerUnavailableError(f"unexpected {reply.TYPE} reply to a status request")
        return reply.status

    def _cache_command(self, op: CacheOp, entry_id: int = -1) -> dict[str, Any]:
        reply = self._exchange(CacheCommand(request_id=uuid.uuid4().hex, op=op, entry_id=entry_id))
        if not isinstance(reply, StatusReply):
            raise PeerUnavailableError(f"unexpected {reply.TYPE} reply to a cache command")
        return reply.status

    def clear_cache(self) -> dict[str, Any]:
        """Drop every cache entry; returns ``{"op": "clear", "cleared": N}``."""
        return self._cache_command(CacheOp.CLEAR)

    def forget_cache_entry(self, entry_id: int) -> dict[str, Any]:
        """Drop one entry (one that answered wrongly); ``{"forgotten": bool, ...}``."""
        return self._cache_command(CacheOp.FORGET, entry_id)

    def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Block until the peer answers a status request; returns that status."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.status(timeout_s=0.5)
            except PeerUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _need(value: Need | str) -> Need:
    """``value`` as a Need; a ValueError naming the choices otherwise."""
    try:
        return Need(value)
    except ValueError:
        choices = ", ".join(n.value for n in Need)
        raise ValueError(f"need must be one of {choices}, got {value!r}") from None
