"""``ccied bench fuzz``: a long fuzz run of every decoder; executions and crashes per decoder.

Four targets, each the function that reads bytes from outside the process:

- ``wire``: :meth:`ccied.peer.wire.MsgpackCodec.decode` (header frame + tensor frames);
  documented error :class:`~ccied.peer.errors.ProtocolError`.
- ``codec``: :meth:`ccied.pruning.codec.TensorCodec.decode`; documented error
  :class:`~ccied.pruning.errors.CodecError`.
- ``bundle``: :func:`ccied.pruning.bundle.load_bundle` on a folder holding a
  manifest and a projection ``.npz``; documented error :class:`~ccied.pruning.errors.ModelError`.
  The model is built once and reused (the target is the manifest, not the model builder).
- ``cache``: :meth:`ccied.cache.CacheStore.load` on a folder holding a snapshot and a
  log; it must never raise, must leave files that load the same way again, and a store
  opened afterwards must persist a new entry.

Inputs start from valid ones (every message type, every bit width, a bundle with a
projection, a cache with a snapshot and a log) and are mutated byte-wise (bit flips,
truncation, splices) and structure-wise (the msgpack or JSON tree edited, then
re-packed with checksums, hashes and lengths fixed so the mutation reaches the deep
checks). A *crash* is any other exception, or a broken invariant; each distinct one
is reported with the input that caused it.

The engine is a plain seeded mutation loop (``--engine mutate``, always available).
``--engine atheris`` runs the same mutators, plus libFuzzer's byte mutations, as
libFuzzer's custom mutator, with coverage of ccied's own modules (instrumented at
import) deciding which inputs libFuzzer keeps; it needs atheris (the ``fuzz`` extra,
``pip install -e '.[fuzz]'``; not a dependency). ``--executions N`` stops each target
after N executions, ``--seconds S`` after S seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import functools
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

TARGETS = ("wire", "codec", "bundle", "cache")
DEFAULT_SECONDS = 60.0
CACHE_BUNDLE = "fuzz-bundle"
CACHE_DIM = 8
MAX_REPORTED_CRASHES = 10

# Values that break parsers: type confusions, limits, non-finite numbers, deep nests.
INTERESTING: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    255,
    65535,
    2**31,
    2**32 - 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    0.5,
    -0.0,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x" * 300,
    "\x00",
    "../../etc/passwd",
    "float32",
    "uint8",
    "object",
    "infer",
    "result",
    "cache_share",
    "blocks.11",
    [],
    {},
    [[[[[]]]]],
    {"a": {"b": {}}},
    [1, 2, 3],
)


# -- generic mutators ----------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes, pool: Sequence[bytes] = ()) -> bytes:
    """One to four byte-level edits: bit flips, bytes set, truncation, insertion, splices."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            del buf[rng.randint(0, len(buf)) :]
        elif op == 3:
            i = rng.randint(0, len(buf))
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and buf:
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 32)]
        elif op == 5 and pool:
            other = rng.choice(pool)
            cut = rng.randint(0, len(buf))
            buf = buf[:cut] + other[rng.randint(0, len(other)) :]
        elif op == 6 and buf:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(
                (0, 1, 0x7F, 0x80, 0xFF, (1 << (8 * width)) - 1, 1 << (8 * width - 1))
            )
            i = rng.randrange(len(buf))
            buf[i : i + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif op == 7 and buf:
            i = rng.randrange(len(buf))
            span = buf[i : i + rng.randint(1, 64)]
            j = rng.randint(0, len(buf))
            buf[j:j] = span * rng.randint(1, 4)
        elif op == 8:
            buf = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(buf)


def _nodes(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every node of a JSON/msgpack-like tree (the root is ())."""
    found = [path]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.extend(_nodes(value, (*path, key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.extend(_nodes(value, (*path, i)))
    return found


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    if depth < 3 and rng.random() < 0.2:
        if rng.random() < 0.5:
            return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return {str(rng.randint(0, 9)): _random_value(rng, depth + 1) for _ in range(3)}
    kind = rng.randrange(5)
    if kind == 0:
        return copy.deepcopy(rng.choice(INTERESTING))
    if kind == 1:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 2:
        return rng.choice((rng.uniform(-1e6, 1e6), rng.randint(-5, 300)))
    if kind == 3:
        return "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 12)))
    return rng.randbytes(rng.randint(0, 16))


def _tweak(rng: random.Random, value: Any) -> Any:
    """A value near the old one: numbers moved, strings edited, containers resized."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, -value, value * 1000, value * 2**20, 0))
    if isinstance(value, float):
        return rng.choice((value * 2, -value, value + 1, math.nextafter(value, math.inf), 0.0))
    if isinstance(value, str):
        return rng.choice((value + "x", value[:-1], value.upper(), value * 2, ""))
    if isinstance(value, list):
        return value * rng.randint(0, 3) if value else [_random_value(rng)]
    if isinstance(value, dict):
        return {}
    return _random_value(rng)


def mutate_tree(rng: random.Random, tree: Any, bytes_ok: bool = True) -> Any:
    """A deep copy of ``tree`` with one to three nodes replaced, tweaked, deleted or added."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_nodes(tree))
        action = rng.randrange(5)
        if not path:
            if action == 0:
                tree = _random_value(rng)
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if action == 0:
            parent[key] = _random_value(rng)
        elif action == 1:
            parent[key] = _tweak(rng, parent[key])
        elif action == 2:
            del parent[key]
        elif action == 3:
            if isinstance(parent, dict):
                parent[rng.choice(("extra", str(key) + "_", "v", "type", "name"))] = _random_value(
                    rng
                )
            else:
                parent.insert(key, _random_value(rng))
        else:
            parent[key] = copy.deepcopy(rng.choice(INTERESTING))
    if not bytes_ok:
        tree = _strip_bytes(tree)
    return tree


def _strip_bytes(tree: Any) -> Any:
    """JSON has no bytes: turn them into text."""
    if isinstance(tree, bytes):
        return tree.hex()
    if isinstance(tree, dict):
        return {str(k): _strip_bytes(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_strip_bytes(v) for v in tree]
    return tree


# -- targets -------------------------------------------------------------------------


class Crash(Exception):
    """A broken invariant (as opposed to an exception the decoder let out)."""


@dataclass
class Target:
    """One decoder: valid seeds, a mutator and the check of one input."""

    name: str
    documented: str  # the one error the decoder may raise ("" when it must not raise)
    seeds: list[Any]
    mutate: Callable[[random.Random, Any], Any]
    execute: Callable[[Any], None]
    describe: Callable[[Any], str]  # the input in a form a test can replay
    close: Callable[[], None] = lambda: None


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# wire ----------------------------------------------------------------------------


def wire_seeds() -> list[list[bytes]]:
    """One valid encoded message of every type (several with tensors of each dtype)."""
    from ccied.peer import wire
    from ccied.peer.defaults import Role

    rng = np.random.default_rng(0)
    messages: list[wire.Message] = [
        wire.Submit(
            request_id="s1",
            frame_name="cam0/1.png",
            pixels=rng.integers(0, 255, (4, 5, 3), dtype=np.uint8),
            bundle_id="b",
        ),
        wire.InferResult(
            request_id="r1",
            label=281,
            class_name="tabby",
            confidence=0.9,
            source=wire.Source.PEER,
            served_by="peer-a",
            cache_entry=3,
            cache_distance=0.1,
            variant="blocks.11-b6",
            bundle_id="b",
        ),
        wire.ErrorReply(request_id="", code=wire.ErrorCode.BUSY, message="full"),
        wire.StatusRequest(request_id="st", bundle_id="b"),
        wire.StatusReply(request_id="st", status={"name": "a", "load": 0.5, "peers": [1, 2]}),
        wire.CacheCommand(request_id="c", op=wire.CacheOp.FORGET, entry_id=7),
        wire.Ping(
            request_id="p",
            bundle_id="b",
            name="a",
            role=Role.EDGE,
            address="tcp://127.0.0.1:5555",
            load=0.25,
            queue_length=1,
            full_ms=12.5,
        ),
        wire.Pong(
            request_id="p",
            bundle_id="b",
            name="b",
            role=Role.CLOUD,
            address="",
            load=0.0,
            queue_length=0,
            full_ms=0.0,
        ),
        wire.CacheShare(
            request_id="cs",
            bundle_id="b",
            origins=["a", "b"],
            labels=[1, 2],
            confidences=[0.9, 0.8],
            features=rng.standard_normal((2, 8)).astype(np.float32),
        ),
        wire.CacheSync(request_id="sync", bundle_id="b", max_entries=64),
    ]
    for name, dtype in wire.DTYPES.items():
        messages.append(
            wire.InferRequest(
                request_id=f"i-{name}",
                bundle_id="b",
                origin="peer-a",
                variant="blocks.11-b6",
                encoding="raw",
                deadline_ms=250.0,
                tensor=np.arange(24).astype(dtype).reshape(1, 2, 3, 4),
            )
        )
    return [wire.encode(message) for message in messages]


def _mutate_wire_header(rng: random.Random, header: dict[str, Any], frames: list[bytes]) -> None:
    from ccied.peer.wire import DTYPES, MessageType

    choice = rng.randrange(4)
    if choice == 0:  # another type with this body: fields of the wrong message
        header["type"] = str(rng.choice(list(MessageType)))
    elif choice == 1 and frames:  # a descriptor that claims another size or dtype
        shape = [rng.choice((1, 2, 3, 7, 2**15, 2**30, 0, -1)) for _ in range(rng.randint(0, 7))]
        header["tensors"] = [[rng.choice([*DTYPES, "float64", "object", "<f4"]), shape]]
    elif choice == 2 and frames:  # a consistent descriptor for a frame of another length
        dtype = rng.choice(list(DTYPES))
        count = len(frames[0]) // DTYPES[dtype].itemsize
        if count:
            header["tensors"] = [[dtype, [count]]]
            frames[0] = frames[0][: count * DTYPES[dtype].itemsize]
    else:
        body = header.get("body")
        if isinstance(body, dict) and body:
            key = rng.choice(list(body))
            body[key] = rng.choice((_random_value(rng), _tweak(rng, body[key])))


def mutate_wire(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """Byte edits of one frame, frame-level edits, or header tree edits re-packed."""
    frames = list(frames)
    op = rng.randrange(5)
    if op == 0 and frames:
        i = rng.randrange(len(frames))
        frames[i] = mutate_bytes(rng, frames[i], frames)
    elif op == 1:
        edit = rng.randrange(4)
        if edit == 0 and frames:
            del frames[rng.randrange(len(frames))]
        elif edit == 1 and frames:
            frames.insert(rng.randint(0, len(frames)), rng.choice(frames))
        elif edit == 2:
            rng.shuffle(frames)
        else:
            frames.append(rng.randbytes(rng.choice((0, 1, 4, 96, 4096))))
    else:
        try:
            header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception:  # a header already broken: edit its bytes instead
            return [mutate_bytes(rng, frames[0]) if frames else b"", *frames[1:]]
        tail = frames[1:]
        if op == 2 and isinstance(header, dict):
            _mutate_wire_header(rng, header, tail)
        else:
            header = mutate_tree(rng, header)
        with contextlib.suppress(OverflowError, TypeError, ValueError):  # msgpack cannot carry it
            frames = [msgpack.packb(header, use_bin_type=True), *tail]
    return frames


def wire_target() -> Target:
    from ccied.peer import wire
    from ccied.peer.errors import ProtocolError

    message_types = tuple(
        cls
        for cls in vars(wire).values()
        if isinstance(cls, type) and isinstance(getattr(cls, "TYPE", None), wire.MessageType)
    )

    def execute(frames: list[bytes]) -> None:
        try:
            message = wire.decode(frames)
        except ProtocolError:
            return
        if not isinstance(message, message_types):
            raise Crash(f"decode returned {type(message).__name__}")

    return Target(
        "wire",
        "ProtocolError",
        wire_seeds(),
        mutate_wire,
        execute,
        lambda frames: json.dumps([_b64(f) for f in frames]),
    )


# codec ---------------------------------------------------------------------------


def codec_seeds() -> list[bytes]:
    """Payloads of every bit width, packed and not, per-channel and shared scales."""
    from ccied.pruning.codec import SUPPORTED_BITS, CodecConfig, TensorCodec

    rng = np.random.default_rng(0)
    seeds = []
    for bits in SUPPORTED_BITS:
        for shared in (False, True):
            for shape in ((1, 3, 4, 5), (1, 16, 7, 7), (1, 1, 1, 1)):
                tensor = rng.standard_normal(shape).astype(np.float32)
                if shape[1] > 3:
                    tensor[:, ::2] = 0.0  # constant channels: the unpacked branch wins
                codec = TensorCodec(CodecConfig(bits=bits, shared_scale=shared))
                seeds.append(codec.encode(tensor))
    return seeds


def _codec_header(data: bytes) -> tuple[int, int, int, int, int, int] | None:
    from ccied.pruning.codec import _HEADER

    if len(data) < _HEADER.size:
        return None
    _, version, bits, flags, _, c, h, w = _HEADER.unpack_from(data)
    return version, bits, flags, c, h, w


def mutate_codec(rng: random.Random, data: bytes) -> bytes:
    """Byte edits, header lies (shapes up to 65535, any bits and flags), or body edits."""
    from ccied.pruning.codec import _HEADER, HEADER_BYTES, MAGIC, MAX_PAYLOAD_BYTES

    op = rng.randrange(4)
    if op == 0 or len(data) < HEADER_BYTES:
        return mutate_bytes(rng, data)
    fields = list(_HEADER.unpack_from(data))
    body = data[HEADER_BYTES:]
    if op == 1:
        index = rng.randrange(1, len(fields))
        fields[index] = rng.choice((0, 1, 2, 3, 4, 6, 8, 16, 255, 1024, 4096, 65535))
        fields[index] %= 256 if index <= 4 else 65536
        fields[0] = MAGIC
        return _HEADER.pack(*fields) + b"\0\0" + body
    try:
        # Mutants may declare a huge body: inflate only what the decoder would accept.
        if not 0 <= zstandard.frame_content_size(body) <= MAX_PAYLOAD_BYTES:
            return mutate_bytes(rng, data)
        inner = zstandard.ZstdDecompressor().decompress(body)
    except zstandard.ZstdError:
        return mutate_bytes(rng, data)
    # A well-formed frame around edited content (NaN scales, wide codes), or of the
    # right size with random content.
    inner = mutate_bytes(rng, inner) if op == 2 else rng.randbytes(len(inner))
    return data[:HEADER_BYTES] + zstandard.ZstdCompressor(level=1).compress(inner)


def codec_target() -> Target:
    from ccied.pruning.codec import TensorCodec
    from ccied.pruning.errors import CodecError

    codec = TensorCodec()

    def execute(data: bytes) -> None:
        try:
            tensor = codec.decode(data)
        except CodecError:
            return
        header = _codec_header(data)
        assert header is not None
        _, _, _, c, h, w = header
        if tensor.shape != (1, c, h, w) or tensor.dtype != np.float32:
            raise Crash(f"decoded {tensor.dtype}{tensor.shape}, header says (1, {c}, {h}, {w})")
        if not np.isfinite(tensor).all():
            raise Crash("decoded tensor holds non-finite values")

    return Target("codec", "CodecError", codec_seeds(), mutate_codec, execute, _b64)  # type: ignore[arg-type]


# bundle --------------------------------------------------------------------------


@dataclass
class BundleInput:
    manifest: bytes
    npz_name: str
    npz: bytes


@functools.cache
def _cached_model(name: str) -> Any:
    from ccied.pruning import models

    return models.load_model(name)


def _projection_npz(rng: np.random.Generator, channels: int = 192, kept: int = 96) -> bytes:
    from ccied.pruning.transfer import DEFAULT_METHOD

    buffer = io.BytesIO()
    np.savez(
        buffer,
        method=np.array(DEFAULT_METHOD),
        mean=rng.standard_normal(channels).astype(np.float32),
        encoder=rng.standard_normal((kept, channels)).astype(np.float32),
        decoder=rng.standard_normal((channels, kept)).astype(np.float32),
        explained_variance=np.array([0.9], dtype=np.float32),
    )
    return buffer.getvalue()


def bundle_seeds(folder: Path) -> list[BundleInput]:
    """A prepared bundle with a reduced variant (and its .npz), and one without."""
    from ccied.pruning.bundle import BUILTIN_VARIANTS, DEFAULT_VARIANT, MANIFEST_NAME, Variant
    from ccied.pruning.bundle import write_bundle as write
    from ccied.pruning.defaults import DEFAULT_MODEL
    from ccied.pruning.transfer import TransferProjection

    model = _cached_model(DEFAULT_MODEL)
    npz = _projection_npz(np.random.default_rng(0))
    with np.load(io.BytesIO(npz), allow_pickle=False) as arrays:
        state = {k: arrays[k] for k in arrays.files if k != "method"}
        method = str(arrays["method"])
    projection = TransferProjection.from_state("blocks.11", method, state)
    reduced = Variant("blocks.11-k0.50-b8", "blocks.11", 0.5, 8, agreement=0.99)
    seeds = []
    for variants, default, projections in (
        ((reduced, *BUILTIN_VARIANTS), reduced.name, {reduced.name: projection}),
        (BUILTIN_VARIANTS, DEFAULT_VARIANT, {}),
    ):
        shutil.rmtree(folder, ignore_errors=True)
        rules = {"thumb16": {"threshold_l2": 0.5}, "blocks.4": {"threshold_l2": 0.2}}
        write(folder, model, variants, default, projections, cache_rules=rules)
        name = f"projection-{reduced.name}.npz"
        npz_bytes = (folder / name).read_bytes() if projections else npz
        seeds.append(BundleInput((folder / MANIFEST_NAME).read_bytes(), name, npz_bytes))
    shutil.rmtree(folder, ignore_errors=True)
    return seeds


def _reseal(manifest: Any, npz_name: str, npz: bytes, rng: random.Random) -> Any:
    """Make a manifest tree self-consistent again: file hash and bundle id."""
    from ccied.pruning.bundle import _bundle_id

    if not isinstance(manifest, dict):
        return manifest
    identity = manifest.get("identity")
    if isinstance(identity, dict):
        files = identity.get("files")
        if isinstance(files, dict) and npz_name in files and rng.random() < 0.9:
            files[npz_name] = hashlib.sha256(npz).hexdigest()
        if rng.random() < 0.9:
            with contextlib.suppress(TypeError, ValueError, RecursionError):
                manifest["bundle_id"] = _bundle_id(identity)
    return manifest


def _mutate_npz(rng: random.Random, npz: bytes) -> bytes:
    """An .npz with arrays dropped, reshaped, retyped, made non-finite or object-typed."""
    try:
        with np.load(io.BytesIO(npz), allow_pickle=False) as loaded:
            arrays: dict[str, Any] = {k: loaded[k] for k in loaded.files}
    except Exception:  # already broken: edit its bytes instead
        return mutate_bytes(rng, npz)
    if arrays:
        key = rng.choice(list(arrays))
        edit = rng.randrange(6)
        if edit == 0:
            del arrays[key]
        elif edit == 1:
            arrays[key] = np.asarray(arrays[key]).reshape(-1)[: rng.randint(0, 8)]
        elif edit == 2:
            arrays[key] = np.asarray(arrays[key]).astype(rng.choice(("f8", "i1", "U4", "c8", "?")))
        elif edit == 3:
            arrays[key] = np.full(np.shape(arrays[key]), rng.choice((np.nan, np.inf)), np.float32)
        elif edit == 4:
            arrays[key] = np.zeros(tuple(rng.randint(0, 3) for _ in range(rng.randint(0, 3))))
        else:
            arrays[key] = np.array([None, {"a": 1}], dtype=object)  # refused unpickled
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def mutate_bundle(rng: random.Random, value: BundleInput) -> BundleInput:
    """Edit the manifest's JSON tree (resealed), its bytes, or the projection file."""
    manifest, npz = value.manifest, value.npz
    op = rng.randrange(6)
    if op == 0:
        manifest = mutate_bytes(rng, manifest)
    elif op == 1:
        npz = mutate_bytes(rng, npz) if rng.random() < 0.5 else _mutate_npz(rng, npz)
    elif op == 2 and rng.random() < 0.05:  # nested too deep for the parser
        depth = rng.choice((1000, 100_000))
        manifest = (b"[" * depth + b"]" * depth)[: 1 << 20]
    if op >= 1:
        try:
            tree = json.loads(manifest)
        except (ValueError, RecursionError):
            return BundleInput(manifest, value.npz_name, npz)
        if op >= 3:
            tree = mutate_tree(rng, tree, bytes_ok=False)
        tree = _reseal(tree, value.npz_name, npz, rng)
        with contextlib.suppress(ValueError, RecursionError):
            manifest = json.dumps(tree).encode()
    return BundleInput(manifest, value.npz_name, npz)


def bundle_target(folder: Path) -> Target:
    from ccied.pruning import bundle
    from ccied.pruning.errors import ModelError

    seeds = bundle_seeds(folder / "seed")
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    # The manifest parser is the target, not the model builder (0.2 s a call).
    namespace = vars(bundle)
    original = namespace["load_model"]
    namespace["load_model"] = _cached_model

    def execute(value: BundleInput) -> None:
        for child in work.iterdir():
            child.unlink()
        (work / bundle.MANIFEST_NAME).write_bytes(value.manifest)
        (work / value.npz_name).write_bytes(value.npz)
        with contextlib.suppress(ModelError):
            bundle.load_bundle(work)

    def close() -> None:
        namespace["load_model"] = original

    return Target(
        "bundle",
        "ModelError",
        seeds,
        mutate_bundle,
        execute,
        lambda v: json.dumps(
            {"manifest": _b64(v.manifest), "npz_name": v.npz_name, "npz": _b64(v.npz)}
        ),
        close,
    )


# cache ---------------------------------------------------------------------------


@dataclass
class CacheInput:
    snapshot: bytes | None
    log: bytes | None


def cache_seeds(folder: Path) -> list[CacheInput]:
    """A store with a snapshot and log records after it (add, forget, clear), and a log alone."""
    from ccied.cache.store import LOG_NAME, SNAPSHOT_NAME, CacheStore, StoredEntry

    rng = np.random.default_rng(0)

    def entry(i: int) -> StoredEntry:
        feature = rng.standard_normal(CACHE_DIM).astype(np.float32)
        return StoredEntry(i, i % 10, 0.9, f"peer-{i}", 1.7e9 + i, feature)

    seeds = []
    for with_snapshot in (True, False):
        shutil.rmtree(folder, ignore_errors=True)
        store = CacheStore(folder, CACHE_BUNDLE, CACHE_DIM, fsync=False)
        store.load()
        entries = [entry(i) for i in range(1, 4)]
        for e in entries:
            store.append_add(e)
        if with_snapshot:
            store.snapshot(entries, next_id=4)
        store.append_add(entry(4))
        store.append_forget(2)
        store.append_add(entry(5))
        if not with_snapshot:
            store.append_clear()
            store.append_add(entry(6))
        store.close()
        snapshot = folder / SNAPSHOT_NAME
        seeds.append(
            CacheInput(
                snapshot.read_bytes() if snapshot.exists() else None,
                (folder / LOG_NAME).read_bytes(),
            )
        )
    shutil.rmtree(folder, ignore_errors=True)
    return seeds


def _split_records(log: bytes) -> list[bytes]:
    records = []
    offset = 0
    while offset + 8 <= len(log):
        (length,) = struct.unpack_from("<I", log, offset)
        records.append(log[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return records


def _seal_record(payload: bytes, good_crc: bool = True) -> bytes:
    crc = zlib.crc32(payload) if good_crc else zlib.crc32(payload) ^ 1
    return struct.pack("<II", len(payload), crc) + payload


def _mutate_snapshot(rng: random.Random, snapshot: bytes) -> bytes:
    from ccied.cache.store import MAGIC

    try:
        offset = len(MAGIC)
        (header_len,) = struct.unpack_from("<I", snapshot, offset)
        raw_header = snapshot[offset + 4 : offset + 4 + header_len]
        header = msgpack.unpackb(raw_header, raw=False)
        body = msgpack.unpackb(snapshot[offset + 4 + header_len :], raw=False)
    except Exception:  # already broken: edit its bytes instead
        return mutate_bytes(rng, snapshot)
    if rng.random() < 0.5:
        header = mutate_tree(rng, header)
    else:
        body = mutate_tree(rng, body)
    try:
        packed_body = msgpack.packb(body, use_bin_type=True)
        if isinstance(header, dict) and rng.random() < 0.9:  # reseal: checksum and count
            header["sha256"] = hashlib.sha256(packed_body).hexdigest()
        packed_header = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return mutate_bytes(rng, snapshot)
    return bytes(MAGIC + struct.pack("<I", len(packed_header)) + packed_header + packed_body)


def _mutate_log(rng: random.Random, log: bytes) -> bytes:
    records = _split_records(log)
    op = rng.randrange(3)
    if op == 0 or not records:
        return mutate_bytes(rng, log)
    if op == 1:
        edit = rng.randrange(3)
        if edit == 0:
            del records[rng.randrange(len(records))]
        elif edit == 1:
            records.insert(rng.randint(0, len(records)), rng.choice(records))
        else:
            rng.shuffle(records)
        return b"".join(_seal_record(r) for r in records)
    i = rng.randrange(len(records))
    try:
        tree = mutate_tree(rng, msgpack.unpackb(records[i], raw=False))
        records[i] = msgpack.packb(tree, use_bin_type=True)
    except Exception:  # unpackable or unrepackable: edit its bytes instead
        records[i] = mutate_bytes(rng, records[i])
    return b"".join(_seal_record(r, good_crc=rng.random() < 0.95) for r in records)


def mutate_cache(rng: random.Random, value: CacheInput) -> CacheInput:
    """Edit the snapshot or the log, by bytes or by msgpack tree (resealed), or drop one."""
    snapshot, log = value.snapshot, value.log
    op = rng.randrange(5)
    if op == 0 and snapshot is not None:
        snapshot = mutate_bytes(rng, snapshot)
    elif op == 1 and snapshot is not None:
        snapshot = _mutate_snapshot(rng, snapshot)
    elif op == 2 and log is not None:
        log = mutate_bytes(rng, log)
    elif op == 3 and log is not None:
        log = _mutate_log(rng, log)
    elif rng.random() < 0.5:
        snapshot = None
    else:
        log = None
    return CacheInput(snapshot, log)


def check_cache_folder(folder: Path, value: CacheInput) -> None:
    """Write the files, load, and check what a restarted peer relies on (Crash if not)."""
    from ccied.cache.store import LOG_NAME, SNAPSHOT_NAME, CacheStore, StoredEntry

    for child in folder.iterdir():
        child.unlink()
    written = {}
    for name, data in ((SNAPSHOT_NAME, value.snapshot), (LOG_NAME, value.log)):
        if data is not None:
            (folder / name).write_bytes(data)
            written[name] = data
    store = CacheStore(folder, CACHE_BUNDLE, CACHE_DIM, fsync=False)
    try:
        first = store.load()
    except Exception as exc:
        raise Crash(f"load() raised {exc!r}") from exc
    finally:
        store.close()
    for name in written:  # nothing is lost: kept, cut to whole records, or moved aside
        if not (folder / name).exists() and not list(folder.glob(name + ".corrupt-*")):
            raise Crash(f"{name} vanished instead of being moved aside")
    again = CacheStore(folder, CACHE_BUNDLE, CACHE_DIM, fsync=False)
    second = again.load()
    if [e.entry_id for e in second.entries] != [e.entry_id for e in first.entries]:
        raise Crash("a second load() found other entries than the first")
    if second.discarded_bytes:
        raise Crash("load() left unusable bytes that the next load() discarded")
    feature = np.arange(CACHE_DIM, dtype=np.float32)
    new = StoredEntry(second.next_id, 7, 0.5, "fuzz", 1.7e9, feature)
    try:
        again.append_add(new)
    except Exception as exc:
        raise Crash(f"a store opened after load() cannot append: {exc!r}") from exc
    finally:
        again.close()
    third = CacheStore(folder, CACHE_BUNDLE, CACHE_DIM, fsync=False).load()
    found = {e.entry_id: e for e in third.entries}.get(new.entry_id)
    if found is None or found.label != 7 or not np.array_equal(found.feature, feature):
        raise Crash("an entry appended after load() is not there on the next load()")


def cache_target(folder: Path) -> Target:
    seeds = cache_seeds(folder / "seed")
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    # The store warns for every unusable file it meets; millions of those are noise here.
    store_log = logging.getLogger("ccied.cache.store")
    level = store_log.level
    store_log.setLevel(logging.CRITICAL)

    def close() -> None:
        store_log.setLevel(level)

    return Target(
        "cache",
        "",
        seeds,
        mutate_cache,
        lambda value: check_cache_folder(work, value),
        lambda v: json.dumps({"snapshot": _b64(v.snapshot), "log": _b64(v.log)}),
        close,
    )


def make_target(name: str, folder: Path) -> Target:
    """Build one target; ``folder`` holds the files the bundle and cache targets need."""
    if name == "wire":
        return wire_target()
    if name == "codec":
        return codec_target()
    if name == "bundle":
        return bundle_target(folder / "bundle")
    if name == "cache":
        return cache_target(folder / "cache")
    raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")


# -- the run -------------------------------------------------------------------------


@dataclass
class TargetResult:
    target: str
    engine: str
    seconds: float
    executions: int
    executions_per_s: float
    crashes: int
    distinct_crashes: list[dict[str, str]] = field(default_factory=list)
    # atheris: libFuzzer's last status line (coverage, features, corpus size).
    engine_notes: str = ""


def _crash_signature(exc: BaseException) -> str:
    frame = exc.__traceback__
    where = ""
    while frame is not None:
        where = f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}"
        frame = frame.tb_next
    return f"{type(exc).__name__} at {os.path.basename(where)}"


class Runner:
    """Executes inputs on a target, counting executions and distinct crashes."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.executions = 0
        self.crashes = 0
        self.distinct: dict[str, dict[str, str]] = {}

    def one(self, value: Any) -> None:
        self.executions += 1
        try:
            self.target.execute(value)
        except Exception as exc:  # any escape is what the fuzzer looks for
            self.crashes += 1
            signature = _crash_signature(exc)
            if signature not in self.distinct and len(self.distinct) < MAX_REPORTED_CRASHES:
                self.distinct[signature] = {
                    "signature": signature,
                    "error": repr(exc)[:300],
                    "input": self.target.describe(value)[:20_000],
                }


def safe_mutate(mutate: Callable[[random.Random, Any], Any], rng: random.Random, value: Any) -> Any:
    """A mutant of ``value``, or ``value`` itself when the mutator cannot handle it."""
    try:
        return mutate(rng, value)
    except Exception:  # a mutator's own failure is no decoder crash: keep the parent
        return value


def run_mutate(
    target: Target, seconds: float | None, seed: int, executions: int | None = None
) -> TargetResult:
    """The plain engine: seeds, then mutants of seeds stacked a few generations deep.

    Stops after ``seconds`` or ``executions`` (seeds included), whichever comes first;
    one of them must be given.
    """
    if seconds is None and executions is None:
        raise ValueError("give seconds, executions or both")
    rng = random.Random(seed)
    runner = Runner(target)
    for value in target.seeds:
        runner.one(value)
    corpus = list(target.seeds)
    start = time.perf_counter()
    deadline = math.inf if seconds is None else start + seconds
    budget = math.inf if executions is None else executions
    while runner.executions < budget:
        for _ in range(int(min(64, budget - runner.executions))):
            value = rng.choice(corpus)
            # A few generations deep: stack mutations on mutants now and then.
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                value = safe_mutate(target.mutate, rng, value)
            runner.one(value)
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    return TargetResult(
        target.name,
        "mutate",
        round(elapsed, 1),
        runner.executions,
        round(runner.executions / elapsed, 1),
        runner.crashes,
        list(runner.distinct.values()),
    )


# -- the atheris engine ----------------------------------------------------------------
#
# libFuzzer keeps an input in its corpus when it reaches new coverage, so the code
# under test must be instrumented (the decoders are imported under
# atheris.instrument_imports) and an input must be a stable byte string: every
# target's input is serialized as a msgpack list of its parts (frames; a payload;
# manifest, projection name and projection; snapshot and log). The custom mutator
# unpacks that list and applies either the structure-aware mutator of the target or
# libFuzzer's own byte mutations (with its comparison-guided dictionary) to one part.
# Bytes that are no such list are taken as the target's main part, raw.


def _to_parts(name: str, value: Any) -> list[Any]:
    if name == "wire":
        return list(value)
    if name == "codec":
        return [value]
    if name == "bundle":
        return [value.manifest, value.npz_name, value.npz]
    return [value.snapshot, value.log]


def _from_parts(target: Target, parts: Any) -> Any:
    """The input a list of parts stands for, or None when it stands for none."""
    if not isinstance(parts, list):
        return None
    if target.name == "wire":
        if parts and all(isinstance(p, bytes) for p in parts):
            return parts
    elif target.name == "codec":
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
    elif target.name == "bundle":
        manifest, npz_name, npz = [*parts, None, None, None][:3]
        if isinstance(manifest, bytes) and isinstance(npz_name, str) and isinstance(npz, bytes):
            return BundleInput(manifest, npz_name, npz)
    elif len(parts) == 2 and all(p is None or isinstance(p, bytes) for p in parts):
        return CacheInput(parts[0], parts[1])
    return None


def atheris_input(target: Target, data: bytes) -> Any:
    """The target input a libFuzzer byte string stands for (every byte string is one)."""
    try:
        value = _from_parts(target, msgpack.unpackb(data, raw=False))
    except Exception:  # not a list of parts: the bytes are the main part, raw
        value = None
    if value is not None:
        return value
    if target.name == "wire":
        return [data]
    if target.name == "codec":
        return data
    if target.name == "bundle":
        seed = target.seeds[0]
        return BundleInput(data, seed.npz_name, seed.npz)
    return CacheInput(None, data)


def atheris_bytes(target: Target, value: Any) -> bytes:
    """The byte string libFuzzer keeps for an input (inverse of :func:`atheris_input`)."""
    packed = msgpack.packb(_to_parts(target.name, value), use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def atheris_mutator(
    target: Target, byte_mutate: Callable[[bytes, int], bytes]
) -> Callable[[bytes, int, int], bytes]:
    """libFuzzer's custom mutator: structure-aware edits, or its byte edits of one part."""

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        value = atheris_input(target, data)
        parts = _to_parts(target.name, value)
        editable = [i for i, p in enumerate(parts) if isinstance(p, bytes)]
        if editable and rng.random() < 0.3:
            i = rng.choice(editable)
            part = parts[i]
            parts[i] = byte_mutate(part, min(max_size, max(2 * len(part), len(part) + 64)))
            mutated = _from_parts(target, parts)
            value = mutated if mutated is not None else value
        else:
            value = safe_mutate(target.mutate, rng, value)
        out = atheris_bytes(target, value)
        if len(out) > max_size:  # too big for libFuzzer: a byte edit of the input instead
            return byte_mutate(data, max_size)
        return out

    return mutate


def _atheris_child(name: str, seconds: float, executions: int, seed: int, folder: Path) -> None:
    """Runs in a subprocess: libFuzzer drives the target until the time or run budget.

    ``folder`` (the parent's, which removes it) receives ``stats.json``, the corpus
    and the target's files. libFuzzer leaves with C ``exit()`` (no ``finally``, no
    ``atexit``), so the child writes its figures every second and ends itself with
    ``os._exit`` once a budget is spent, after writing them.
    """
    atheris = importlib.import_module("atheris")
    stats_path, corpus, work = folder / "stats.json", folder / "corpus", folder / "work"
    corpus.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    # Coverage of ccied's own code (decoders, store, bundle loader) steers libFuzzer.
    with atheris.instrument_imports(include=["ccied"]):
        target = make_target(name, work)
    runner = Runner(target)
    seeds = [atheris_bytes(target, value) for value in target.seeds]
    for i, data in enumerate(seeds):
        (corpus / f"seed-{i:03d}").write_bytes(data)
    max_len = max(1 << 16, 2 * max(len(data) for data in seeds))
    start = time.perf_counter()
    last_write = [start]

    def write_stats() -> None:
        elapsed = time.perf_counter() - start
        result = TargetResult(
            name,
            "atheris",
            round(elapsed, 1),
            runner.executions,
            round(runner.executions / max(elapsed, 1e-9), 1),
            runner.crashes,
            list(runner.distinct.values()),
        )
        stats_path.write_text(json.dumps(asdict(result)))

    def test_one_input(data: bytes) -> None:
        runner.one(atheris_input(target, data))
        now = time.perf_counter()
        if runner.executions >= executions or now - start >= seconds:
            write_stats()
            os._exit(0)
        if now - last_write[0] > 1.0:
            last_write[0] = now
            write_stats()

    options = [f"-max_len={max_len}", f"-seed={seed}", "-rss_limit_mb=4096"]
    if math.isfinite(seconds):  # a backstop only: the callback ends the run on time
        options.append(f"-max_total_time={math.ceil(seconds) + 60}")
    atheris.Setup(
        [sys.argv[0], *options, str(corpus)],
        test_one_input,
        # Looked up per call: Fuzz() replaces the stub Mutate that raises before it.
        custom_mutator=atheris_mutator(target, lambda data, size: atheris.Mutate(data, size)),
    )
    atheris.Fuzz()


def _last_status(log: str) -> str:
    """libFuzzer's last status line (``#N NEW cov: ... ft: ... corp: ...``)."""
    lines = [line for line in log.splitlines() if line.startswith("#") and "cov:" in line]
    return lines[-1] if lines else ""


def run_atheris(
    name: str, seconds: float | None, executions: int | None, seed: int
) -> TargetResult:
    """Run one target under atheris in a subprocess (libFuzzer owns its process)."""
    if seconds is None and executions is None:
        raise ValueError("give seconds, executions or both")
    limit = math.inf if seconds is None else seconds
    with tempfile.TemporaryDirectory(prefix="ccied-fuzz-") as tmp:
        stats = Path(tmp) / "stats.json"
        log_path = Path(tmp) / "libfuzzer.log"
        with log_path.open("wb") as log:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ccied.bench.fuzz",
                    "--atheris-child",
                    name,
                    str(limit),
                    str(executions or sys.maxsize),
                    str(seed),
                    tmp,
                ],
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                timeout=None if seconds is None else seconds + 300,
            )
        text = log_path.read_text(errors="replace")
        if not stats.exists():
            tail = "\n".join(text.splitlines()[-20:])
            raise RuntimeError(f"the atheris run of {name} wrote no figures; its log ends:\n{tail}")
        result = TargetResult(**json.loads(stats.read_text()))
        result.engine_notes = _last_status(text)
        return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ccied bench fuzz``."""
    parser.add_argument(
        "--target",
        choices=TARGETS,
        action="append",
        help="decoder to fuzz (repeatable; default: all of them)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"seconds per target (default {DEFAULT_SECONDS:g} unless --executions is given)",
    )
    parser.add_argument(
        "--executions",
        type=int,
        help="stop a target after this many executions (with --seconds: whichever comes first)",
    )
    parser.add_argument(
        "--engine",
        choices=("mutate", "atheris"),
        default="mutate",
        help="mutate: seeded mutation loop (default); atheris: libFuzzer coverage feedback",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutate engine")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")


def run(args: argparse.Namespace) -> int:
    """Fuzz each chosen target; print executions and crashes; 1 if anything crashed."""
    names = args.target or list(TARGETS)
    seconds = args.seconds
    if seconds is None and args.executions is None:
        seconds = DEFAULT_SECONDS
    if args.engine == "atheris" and importlib.util.find_spec("atheris") is None:
        print(
            "atheris is not installed (pip install -e '.[fuzz]'); use --engine mutate",
            file=sys.stderr,
        )
        return 2
    results = []
    for name in names:
        if args.engine == "atheris":
            result = run_atheris(name, seconds, args.executions, args.seed)
        else:
            with tempfile.TemporaryDirectory(prefix="ccied-fuzz-") as tmp:
                target = make_target(name, Path(tmp))
                try:
                    result = run_mutate(target, seconds, args.seed, args.executions)
                finally:
                    target.close()
        results.append(result)
        print(
            f"{result.target:7s} {result.executions:>10,d} executions in {result.seconds:6.1f} s"
            f"  ({result.executions_per_s:>8,.0f}/s)  crashes: {result.crashes}"
        )
        for crash in result.distinct_crashes:
            print(f"    {crash['signature']}: {crash['error'][:160]}")
    if args.json:
        args.json.write_text(
            json.dumps({"engine": args.engine, "results": [asdict(r) for r in results]}, indent=2)
        )
    return 1 if any(r.crashes for r in results) else 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--atheris-child":
        _atheris_child(
            sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
        )
        sys.exit(0)
    main_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    add_arguments(main_parser)
    sys.exit(run(main_parser.parse_args()))
