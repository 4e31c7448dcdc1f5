"""10,000 malformed messages on a real peer's local socket, and the peer keeps serving.

One ``ccied peer`` process (no TCP listener, so only its local socket exists) gets a
deterministic mix of garbage frames, truncated and corrupted valid messages, wrong
msgpack types, huge declared shapes, wrong dtypes, wrong frame counts, empty frames
and messages of the wrong kind for the local socket. The client keeps a few requests
in flight (fewer than the peer queues, so no BUSY answer is expected) and then checks
that the daemon is the same process, still answers ``status``, counted exactly the
errors it should have, answered every message once with the expected error and
request id, and still classifies a real frame correctly.

The expected answer of each message comes from the wire decoder used as an oracle:
a message it refuses must get a ``protocol`` error carrying the request id the
decoder could read (``''`` when none); a message it accepts must be one the local
socket refuses (``unsupported``) or a frame that is not RGB uint8 (``bad_frame``).
Generated messages the local socket would serve (a valid status, cache command or
frame) are replaced, so the flood neither runs the model nor changes the cache.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from ccied.bench.cluster import PeerProcess, running
from ccied.peer.client import Client
from ccied.peer.errors import ProtocolError
from ccied.peer.wire import (
    MAX_HEADER_BYTES,
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
from ccied.pruning import MediaError, StagedModel, preprocess
from ccied.pruning.media import check_frame
from peers import dealer, local_address, peer_process

pytestmark = pytest.mark.slow

MESSAGES = 10_000
# Requests in flight at once: below the peer's queue (32), so none is answered BUSY.
WINDOW = 16
REPLY_TIMEOUT_MS = 10_000

Frames = list[bytes]


# -- the messages ----------------------------------------------------------------------


def _valid(rng: random.Random, request_id: str) -> Message:
    """A valid message of any type, with a small frame or tensor where it has one."""
    pixels = np.frombuffer(rng.randbytes(8 * 9 * 3), np.uint8).reshape(8, 9, 3)
    tensor = np.zeros((1, 4, 2, 2), np.float32)
    choices: list[Callable[[], Message]] = [
        lambda: Submit(request_id=request_id, frame_name="f.png", pixels=pixels),
        lambda: StatusRequest(request_id=request_id),
        lambda: CacheCommand(request_id=request_id, op=CacheOp.FORGET, entry_id=3),
        lambda: InferRequest(
            request_id=request_id,
            bundle_id="b",
            origin="x",
            variant="blocks.11-b6",
            encoding="raw",
            deadline_ms=100.0,
            tensor=tensor,
        ),
        lambda: Ping(
            request_id=request_id,
            bundle_id="b",
            name="n",
            role="edge",
            address="",
            load=0.0,
            queue_length=0,
            full_ms=1.0,
        ),
        lambda: CacheShare(
            request_id=request_id,
            bundle_id="b",
            origins=["a"],
            labels=[1],
            confidences=[0.5],
            features=np.zeros((1, 8), np.float32),
        ),
        lambda: CacheSync(request_id=request_id, bundle_id="b", max_entries=4),
        lambda: InferResult(
            request_id=request_id,
            label=1,
            class_name="c",
            confidence=0.5,
            source=Source.LOCAL,
            served_by="x",
        ),
        lambda: ErrorReply(request_id=request_id, code=ErrorCode.BUSY, message="m"),
    ]
    return rng.choice(choices)()


def _header(frames: Frames) -> dict[Any, Any]:
    header: dict[Any, Any] = msgpack.unpackb(frames[0], raw=False)
    return header


def _pack(header: Any) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def garbage(rng: random.Random, rid: str) -> Frames:
    sizes = (0, 1, 2, 7, 64, 300, 4096)
    return [rng.randbytes(rng.choice(sizes)) for _ in range(rng.randint(1, 3))]


def truncated(rng: random.Random, rid: str) -> Frames:
    frames = encode(_valid(rng, rid))
    i = rng.randrange(len(frames))
    frames[i] = frames[i][: rng.randrange(max(1, len(frames[i])))]
    return frames


def corrupted(rng: random.Random, rid: str) -> Frames:
    frames = encode(_valid(rng, rid))
    header = bytearray(frames[0])
    for _ in range(rng.randint(1, 4)):
        header[rng.randrange(len(header))] ^= 1 << rng.randrange(8)
    return [bytes(header), *frames[1:]]


WRONG_VALUES: tuple[Any, ...] = (None, True, -1, 2**64 - 1, 1.5, "x", b"raw", [], {}, [[1]])


def wrong_types(rng: random.Random, rid: str) -> Frames:
    """A header (or one of its fields) of another msgpack type than the format's."""
    frames = encode(_valid(rng, rid))
    header = _header(frames)
    choice = rng.randrange(4)
    if choice == 0:  # the header itself is no map
        return [_pack(rng.choice(([rid, "submit"], rid, 7, None, 1.5))), *frames[1:]]
    if choice == 1:  # a top-level field ("id" of another type: no readable id)
        header[rng.choice(["v", "type", "id", "bundle", "body", "tensors"])] = rng.choice(
            WRONG_VALUES
        )
    elif choice == 2 and header["body"]:  # a body field
        header["body"][rng.choice(list(header["body"]))] = rng.choice(WRONG_VALUES)
    else:  # msgpack features the decoder refuses: int map keys, ext types, trailing bytes
        refused = rng.randrange(3)
        if refused == 0:
            header[rng.choice([1, 2])] = 0
        elif refused == 1:
            header["body"]["ext"] = msgpack.ExtType(1, b"xx")
        else:
            return [_pack(header) + _pack(rid), *frames[1:]]
    return [_pack(header), *frames[1:]]


def huge_shapes(rng: random.Random, rid: str) -> Frames:
    """A descriptor declaring a tensor far bigger than its frame (or than any limit)."""
    frames = encode(Submit(request_id=rid, frame_name="f", pixels=np.zeros((8, 8, 3), np.uint8)))
    header = _header(frames)
    shape = rng.choice(
        (
            [2**30, 2**30, 3],
            [2**31, 3],
            [4096, 4096, 3],
            [1 << 30] * 6,
            [1] * 7,
            [8, 8, 3, 0],
            [8, -8, 3],
            [2**64 - 1],
            [],
        )
    )
    header["tensors"] = [["uint8", shape]]
    return [_pack(header), frames[1]]


def wrong_dtypes(rng: random.Random, rid: str) -> Frames:
    """A dtype the wire refuses, or one it carries that is no frame (bad_frame then)."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    if rng.random() < 0.2:
        dtype = rng.choice((np.int16, np.float32, np.int8, np.float16))
        return encode(Submit(request_id=rid, frame_name="f", pixels=pixels.astype(dtype)))
    frames = encode(Submit(request_id=rid, frame_name="f", pixels=pixels))
    header = _header(frames)
    name = rng.choice(("float64", "object", "<f4", "|O", "complex64", "bool", "S8", "", 3, None))
    header["tensors"][0][0] = name
    return [_pack(header), frames[1]]


def wrong_frame_counts(rng: random.Random, rid: str) -> Frames:
    frames = encode(_valid(rng, rid))
    choice = rng.randrange(3)
    if choice == 0 and len(frames) > 1:  # the tensor frame missing
        return frames[:1]
    if choice == 1:  # frames nobody declared
        return [*frames, *(rng.randbytes(12) for _ in range(rng.randint(1, 8)))]
    header = _header(frames)  # more descriptors than the format allows
    header["tensors"] = [["uint8", [4]]] * 5
    return [_pack(header), *([bytes(4)] * 5)]


def empty_frames(rng: random.Random, rid: str) -> Frames:
    frames = encode(_valid(rng, rid))
    choice = rng.randrange(3)
    if choice == 0:
        return [b""] * rng.randint(1, 5)
    if choice == 1:
        return [frames[0], *([b""] * max(1, len(frames) - 1))]
    return [b"", *frames[1:]] if len(frames) > 1 else [b"", b""]


def oversized_header(rng: random.Random, rid: str) -> Frames:
    header = _header(encode(StatusRequest(request_id=rid)))
    header["pad"] = "x" * 4000
    header["more"] = ["y" * 4000] * 16  # a header beyond MAX_HEADER_BYTES
    packed = _pack(header)
    assert len(packed) > MAX_HEADER_BYTES
    return [packed]


def wrong_socket(rng: random.Random, rid: str) -> Frames:
    """Valid messages the local socket does not serve (peer-to-peer ones)."""
    return encode(_valid(rng, rid))


# Each kind of message and its share of the flood (percent).
KINDS: dict[str, tuple[Callable[[random.Random, str], Frames], int]] = {
    "garbage": (garbage, 14),
    "truncated": (truncated, 12),
    "corrupted": (corrupted, 12),
    "wrong_types": (wrong_types, 12),
    "huge_shapes": (huge_shapes, 10),
    "wrong_dtypes": (wrong_dtypes, 10),
    "wrong_frame_counts": (wrong_frame_counts, 10),
    "empty_frames": (empty_frames, 8),
    "oversized_header": (oversized_header, 2),
    "wrong_socket": (wrong_socket, 10),
}


def expected_reply(frames: Frames) -> tuple[str, ErrorCode] | None:
    """(request id, error code) the peer must answer, or None for a message it would serve."""
    try:
        message = decode(frames)
    except ProtocolError as exc:
        return exc.request_id, ErrorCode.PROTOCOL
    if isinstance(message, Submit):
        try:
            check_frame(message.pixels)
        except MediaError:
            return message.request_id, ErrorCode.BAD_FRAME
        return None  # a frame it would classify
    if isinstance(message, StatusRequest | CacheCommand):
        return None
    return message.request_id, ErrorCode.UNSUPPORTED


def flood(seed: int, count: int) -> list[tuple[str, Frames, tuple[str, ErrorCode]]]:
    """``count`` (kind, frames, expected answer), kinds drawn by their shares, ids unique."""
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [share for _, share in KINDS.values()]
    messages: list[tuple[str, Frames, tuple[str, ErrorCode]]] = []
    while len(messages) < count:
        (kind,) = rng.choices(names, weights)
        expected = None
        while expected is None:  # a message the peer would serve: draw again
            frames = KINDS[kind][0](rng, f"m{len(messages)}")
            expected = expected_reply(frames)
        messages.append((kind, frames, expected))
    return messages


# -- the test --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer(workdir: Path) -> Iterator[PeerProcess]:
    # No TCP socket: the local one is under test.
    process = peer_process(workdir, "flood1", "edge", listen="none")
    with running([process]):
        yield process


def test_the_flood_covers_every_kind_and_mostly_carries_request_ids() -> None:
    messages = flood(2026, MESSAGES)
    kinds = Counter(kind for kind, _, _ in messages)
    assert set(kinds) == set(KINDS)
    for kind, (_, share) in KINDS.items():
        assert kinds[kind] > MESSAGES * share / 100 * 0.8, kind
    codes = Counter(code for _, _, (_, code) in messages)
    assert codes[ErrorCode.PROTOCOL] > MESSAGES // 2
    assert codes[ErrorCode.UNSUPPORTED] > 100 and codes[ErrorCode.BAD_FRAME] > 50
    with_id = sum(1 for _, _, (rid, _) in messages if rid)
    assert with_id > MESSAGES // 2, "most malformed messages still name their request"


def exchange_all(peer: PeerProcess, messages: list[Frames], window: int) -> list[Message]:
    """Send every message over one DEALER, at most ``window`` unanswered; the replies."""
    sock = dealer()
    sock.connect(local_address(peer))
    replies: list[Message] = []
    try:
        sent = 0
        while len(replies) < len(messages):
            while sent < len(messages) and sent - len(replies) < window:
                sock.send_multipart(messages[sent])
                sent += 1
            assert sock.poll(REPLY_TIMEOUT_MS), (
                f"no reply in {REPLY_TIMEOUT_MS} ms after {len(replies)} of {len(messages)}; "
                f"peer alive: {peer.process is not None and peer.process.poll() is None}"
            )
            replies.append(decode(sock.recv_multipart()))
        assert not sock.poll(200), "one answer per message, not more"
    finally:
        sock.close(linger=0)
    return replies


def error_replies(replies: list[Message]) -> Counter[tuple[str, ErrorCode]]:
    """(request id, code) of every reply, all of which must be errors."""
    assert all(isinstance(reply, ErrorReply) for reply in replies), [
        r for r in replies if not isinstance(r, ErrorReply)
    ][:3]
    return Counter((r.request_id, r.code) for r in replies if isinstance(r, ErrorReply))


def counters_moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    keys = ("protocol_errors", "errors", "busy", "submitted", "answered")
    return {key: after["requests"][key] - before["requests"][key] for key in keys}


def test_ten_thousand_malformed_messages_leave_the_peer_serving(
    peer: PeerProcess, model: StagedModel, cat_pixels: np.ndarray
) -> None:
    messages = flood(2026, MESSAGES)
    with Client(peer.socket_path) as client:
        before = client.status()
    start = time.monotonic()
    replies = exchange_all(peer, [frames for _, frames, _ in messages], WINDOW)
    elapsed = time.monotonic() - start

    # The same process, still answering status.
    assert peer.process is not None and peer.process.poll() is None
    with Client(peer.socket_path) as client:
        after = client.status()
    assert after["pid"] == before["pid"]

    # Every message answered once, with an error naming the request id it carried
    # (ids are unique, so the multisets say which message each answer is for).
    got = error_replies(replies)
    want = Counter(expected for _, _, expected in messages)
    assert got == want, (
        f"missing: {list((want - got).items())[:5]}, unexpected: {list((got - want).items())[:5]}"
    )

    # The counters moved by exactly what was sent: no busy, no internal error.
    codes = Counter(code for _, code in want.elements())
    moved = counters_moved(before, after)
    assert moved == {
        "protocol_errors": codes[ErrorCode.PROTOCOL],
        "errors": codes[ErrorCode.BAD_FRAME],
        "busy": 0,
        "submitted": codes[ErrorCode.BAD_FRAME],
        "answered": 0,
    }, moved
    assert after["requests"]["pending"] <= 1  # the status request itself

    # A real frame afterwards gets the full model's label.
    with Client(peer.socket_path) as client:
        result = client.submit(cat_pixels, "after-flood")
    with torch.inference_mode():
        label = int(model.full()(preprocess(cat_pixels, model.spec)).argmax())
    assert result.label == label and result.served_by == "flood1"
    assert elapsed < 60, f"{len(messages)} messages took {elapsed:.1f} s"


def test_a_burst_gets_each_message_its_error_or_busy_with_its_request_id(
    peer: PeerProcess,
) -> None:
    """All at once (no window): the queue may fill, and BUSY answers name the request too."""
    messages = flood(7, 500)
    with Client(peer.socket_path) as client:
        before = client.status()
    replies = exchange_all(peer, [frames for _, frames, _ in messages], len(messages))
    with Client(peer.socket_path) as client:
        after = client.status()
    got = error_replies(replies)
    busy = Counter({(rid, code): n for (rid, code), n in got.items() if code is ErrorCode.BUSY})
    want = Counter(expected for _, _, expected in messages)
    # Each BUSY answer stands in for the error its message would have had.
    answered = Counter({key: n for key, n in got.items() if key[1] is not ErrorCode.BUSY})
    assert answered <= want
    assert Counter(rid for rid, _ in (want - answered).elements()) == Counter(
        rid for rid, _ in busy.elements()
    )
    codes = Counter(code for _, code in got.elements())
    assert counters_moved(before, after) == {
        "protocol_errors": codes[ErrorCode.PROTOCOL],
        "errors": codes[ErrorCode.BAD_FRAME],
        "busy": codes[ErrorCode.BUSY],
        "submitted": codes[ErrorCode.BAD_FRAME],
        "answered": 0,
    }
    assert peer.process is not None and peer.process.poll() is None


def test_the_expected_answers_match_the_reply_types() -> None:
    """The oracle itself: a valid frame or status is not in the flood; peer types are."""
    status = encode(StatusRequest(request_id="s"))
    assert expected_reply(status) is None
    frame = encode(Submit(request_id="f", frame_name="f", pixels=np.zeros((8, 8, 3), np.uint8)))
    assert expected_reply(frame) is None
    pong = Pong(
        request_id="p",
        bundle_id="b",
        name="n",
        role="edge",
        address="",
        load=0.0,
        queue_length=0,
        full_ms=0.0,
    )
    assert expected_reply(encode(pong)) == ("p", ErrorCode.UNSUPPORTED)
    assert expected_reply(encode(StatusReply(request_id="r"))) == ("r", ErrorCode.UNSUPPORTED)
    assert expected_reply([b"\xc1"]) == ("", ErrorCode.PROTOCOL)
