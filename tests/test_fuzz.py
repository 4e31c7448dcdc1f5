"""Fuzz targets for every decoder, bounded for the test suite (``ccied bench fuzz`` runs long).

Each test starts from valid inputs (the seeds of :mod:`ccied.bench.fuzz`) and lets
hypothesis drive the structure-aware mutators, so mutations reach the checks behind
checksums, hashes and lengths. Only the documented error may escape.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import struct
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard
from ccied.bench import fuzz
from ccied.cache.store import SNAPSHOT_NAME
from ccied.peer.wire import decode
from ccied.pruning import bundle
from ccied.pruning.codec import MAGIC, MAX_ELEMENTS, MAX_SIDE, TensorCodec
from ccied.pruning.errors import CodecError, ModelError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WIRE_SEEDS = fuzz.wire_seeds()
CODEC_SEEDS = fuzz.codec_seeds()
WIRE = fuzz.wire_target()
CODEC = fuzz.codec_target()
SETTINGS = settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


# -- wire ------------------------------------------------------------------------------


def test_the_wire_seeds_cover_every_message_type() -> None:
    from ccied.peer.wire import MessageType

    kinds = {type(decode(frames)).TYPE for frames in WIRE_SEEDS}
    assert kinds == set(MessageType)


@settings(SETTINGS, max_examples=400)
@given(st.sampled_from(WIRE_SEEDS), st.randoms(use_true_random=False))
def test_structure_aware_wire_mutations_raise_only_protocol_error(
    frames: list[bytes], rng: random.Random
) -> None:
    for _ in range(rng.randint(1, 3)):
        frames = fuzz.safe_mutate(WIRE.mutate, rng, frames)
    WIRE.execute(frames)  # ProtocolError is swallowed; anything else fails


# -- codec -----------------------------------------------------------------------------


@settings(SETTINGS, max_examples=300)
@given(st.sampled_from(CODEC_SEEDS), st.randoms(use_true_random=False))
def test_mutated_codec_payloads_raise_only_codec_error(data: bytes, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        data = fuzz.safe_mutate(CODEC.mutate, rng, data)
    CODEC.execute(data)


@settings(SETTINGS, max_examples=150)
@given(st.sampled_from(CODEC_SEEDS), st.integers(0, 1 << 16))
def test_truncated_codec_payloads_are_refused(data: bytes, cut: int) -> None:
    with pytest.raises(CodecError):
        TensorCodec().decode(data[: cut % len(data)])


def _implied_elements(c: int, h: int, w: int) -> int:
    """Elements a header may make the decoder allocate for (0 when it is out of bounds)."""
    inside = 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE and c * h * w <= MAX_ELEMENTS
    return c * h * w if inside else 0


@settings(SETTINGS, max_examples=60)
@given(
    bits=st.sampled_from([0, 1, 2, 3, 4, 6, 8, 9, 255]),
    flags=st.integers(0, 7),
    c=st.sampled_from([1, 3, 4096, 4097, 65535]),
    h=st.sampled_from([1, 7, 1024, 1025, 65535]),
    w=st.sampled_from([1, 7, 1024, 65535]),
    body=st.binary(max_size=256),
    declare=st.booleans(),
)
def test_headers_claiming_huge_shapes_allocate_no_more_than_they_imply(
    bits: int, flags: int, c: int, h: int, w: int, body: bytes, declare: bool
) -> None:
    frame = body if not declare else zstandard.ZstdCompressor(level=1).compress(body)
    data = struct.pack("<4sBBBBHHH", MAGIC, 1, bits, flags, 0, c, h, w) + b"\0\0" + frame
    codec = TensorCodec()
    tracemalloc.start()
    try:
        with contextlib.suppress(CodecError):
            codec.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Codes, their float32 image and the output: a few bytes per element, plus copies
    # of the payload. A decoder that trusted an unchecked size would blow through this.
    assert peak <= 24 * _implied_elements(c, h, w) + 4 * len(data) + (256 << 10)


def test_a_zstd_bomb_behind_a_small_header_is_not_inflated() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    data = struct.pack("<4sBBBBHHH", MAGIC, 1, 8, 0, 0, 1, 1, 1) + b"\0\0" + bomb
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            TensorCodec().decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# -- bundle manifest and projection ------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz.Target]:
    target = fuzz.bundle_target(tmp_path_factory.mktemp("bundle-fuzz"))
    yield target
    target.close()


def test_the_bundle_seeds_load(bundle_target: fuzz.Target, tmp_path: Path) -> None:
    for seed in bundle_target.seeds:
        (tmp_path / bundle.MANIFEST_NAME).write_bytes(seed.manifest)
        (tmp_path / seed.npz_name).write_bytes(seed.npz)
        assert bundle.load_bundle(tmp_path).bundle_id == json.loads(seed.manifest)["bundle_id"]


@settings(SETTINGS, max_examples=250)
@given(st.data(), st.randoms(use_true_random=False))
def test_mutated_bundles_raise_only_model_error(
    bundle_target: fuzz.Target, data: st.DataObject, rng: random.Random
) -> None:
    value = data.draw(st.sampled_from(bundle_target.seeds))
    for _ in range(rng.randint(1, 3)):
        value = fuzz.safe_mutate(bundle_target.mutate, rng, value)
    bundle_target.execute(value)


@pytest.mark.parametrize(
    "manifest",
    [
        b'{"identity": {"format": 1, "model": "efficientnet_lite0", "files": []}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"identity": 1e999}',
        b"\xff\xfe",
    ],
)
def test_specific_malformed_manifests_are_model_errors(tmp_path: Path, manifest: bytes) -> None:
    (tmp_path / bundle.MANIFEST_NAME).write_bytes(manifest)
    with pytest.raises(ModelError):
        bundle.load_bundle(tmp_path)


def test_a_manifest_with_infinite_bits_is_a_model_error(
    bundle_target: fuzz.Target, tmp_path: Path
) -> None:
    manifest = json.loads(bundle_target.seeds[1].manifest)
    manifest["identity"]["variants"][0]["bits"] = float("inf")
    (tmp_path / bundle.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="malformed manifest"):
        bundle.load_bundle(tmp_path)


def test_a_damaged_projection_with_a_matching_hash_is_a_model_error(
    bundle_target: fuzz.Target, tmp_path: Path
) -> None:
    seed = bundle_target.seeds[0]
    npz = b"PK\x03\x04" + seed.npz[4:100]  # a zip cut short; the manifest vouches for it
    manifest = fuzz._reseal(json.loads(seed.manifest), seed.npz_name, npz, random.Random(1))
    (tmp_path / bundle.MANIFEST_NAME).write_text(json.dumps(manifest))
    (tmp_path / seed.npz_name).write_bytes(npz)
    with pytest.raises(ModelError, match=r"unreadable projection|altered"):
        bundle.load_bundle(tmp_path)


def _npz_with_a_broken_header() -> bytes:
    """An .npz whose 'mean' member has an .npy header numpy cannot tokenize."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,"
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(12)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mean.npy", member)
    return buffer.getvalue()


def test_a_projection_with_an_untokenizable_npy_header_is_a_model_error(
    bundle_target: fuzz.Target, tmp_path: Path
) -> None:
    # Found by `ccied bench fuzz --target bundle` after 1.3 million executions:
    # numpy's header parser raised tokenize.TokenError out of load_bundle.
    seed = bundle_target.seeds[0]
    npz = _npz_with_a_broken_header()
    manifest = fuzz._reseal(json.loads(seed.manifest), seed.npz_name, npz, random.Random(1))
    (tmp_path / bundle.MANIFEST_NAME).write_text(json.dumps(manifest))
    (tmp_path / seed.npz_name).write_bytes(npz)
    with pytest.raises(ModelError, match=r"unreadable projection|altered"):
        bundle.load_bundle(tmp_path)


def _patch_zip(npz: bytes, flags: int = 0, method: int | None = None) -> bytes:
    """Set general-purpose flag bits, or the compression method, of every member."""
    data = bytearray(npz)
    for signature, flags_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = data.find(signature)
        while start != -1:
            (old,) = struct.unpack_from("<H", data, start + flags_at)
            struct.pack_into("<H", data, start + flags_at, old | flags)
            if method is not None:
                struct.pack_into("<H", data, start + method_at, method)
            start = data.find(signature, start + 4)
    return bytes(data)


def _lzma_member_with_bad_properties() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # stored, then relabelled as LZMA
        archive.writestr("mean.npy", b"\x09\x04\x05\x00" + b"\xff" * 45)
    return _patch_zip(buffer.getvalue(), method=14)


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("encrypted", lambda npz: _patch_zip(npz, flags=0x01)),
        ("compressed patched data", lambda npz: _patch_zip(npz, flags=0x20)),
        ("strong encryption", lambda npz: _patch_zip(npz, flags=0x40)),
        ("unknown compression", lambda npz: _patch_zip(npz, method=99)),
        ("lzma with bad properties", lambda npz: _lzma_member_with_bad_properties()),
    ],
)
def test_a_projection_zip_that_zipfile_cannot_read_is_a_model_error(
    bundle_target: fuzz.Target, tmp_path: Path, case: str, make: Callable[[bytes], bytes]
) -> None:
    # Found by `ccied bench fuzz --engine atheris --target bundle` (coverage-guided)
    # within 300,000 executions: zipfile raised NotImplementedError out of load_bundle
    # (flag bits 5 and 6, an unsupported method); the encrypted flag (RuntimeError)
    # and a broken LZMA member (LZMAError) are the same family.
    seed = bundle_target.seeds[0]
    npz = make(seed.npz)
    manifest = fuzz._reseal(json.loads(seed.manifest), seed.npz_name, npz, random.Random(1))
    (tmp_path / bundle.MANIFEST_NAME).write_text(json.dumps(manifest))
    (tmp_path / seed.npz_name).write_bytes(npz)
    with pytest.raises(ModelError, match="unreadable projection"):
        bundle.load_bundle(tmp_path)


# -- cache snapshot and log --------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[fuzz.CacheInput]:
    return fuzz.cache_seeds(tmp_path_factory.mktemp("cache-seed"))


@settings(SETTINGS, max_examples=200)
@given(st.data(), st.randoms(use_true_random=False))
def test_mutated_cache_files_never_stop_the_store(
    cache_seeds: list[fuzz.CacheInput],
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
    rng: random.Random,
) -> None:
    value = data.draw(st.sampled_from(cache_seeds))
    for _ in range(rng.randint(1, 3)):
        value = fuzz.safe_mutate(fuzz.mutate_cache, rng, value)
    # load() never raises, keeps or moves aside every file, loads the same twice, and
    # a store opened afterwards persists a new entry.
    fuzz.check_cache_folder(tmp_path_factory.mktemp("cache"), value)


@settings(SETTINGS, max_examples=60)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_garbage_cache_files_are_moved_aside_or_cut(
    tmp_path_factory: pytest.TempPathFactory, snapshot: bytes, log: bytes
) -> None:
    folder = tmp_path_factory.mktemp("cache")
    fuzz.check_cache_folder(folder, fuzz.CacheInput(snapshot, log))
    # Random bytes are never a valid snapshot: it was moved aside, not loaded.
    assert list(folder.glob(SNAPSHOT_NAME + ".corrupt-*"))


def test_a_snapshot_with_an_unwritable_next_id_is_moved_aside(
    cache_seeds: list[fuzz.CacheInput], tmp_path: Path
) -> None:
    seed = cache_seeds[0]
    assert seed.snapshot is not None
    import msgpack
    from ccied.cache.store import MAGIC

    (length,) = struct.unpack_from("<I", seed.snapshot, len(MAGIC))
    start = len(MAGIC) + 4
    header = msgpack.unpackb(seed.snapshot[start : start + length])
    header["next_id"] = 2**64 - 1  # the header is not checksummed
    packed = msgpack.packb(header)
    snapshot = MAGIC + struct.pack("<I", len(packed)) + packed + seed.snapshot[start + length :]
    fuzz.check_cache_folder(tmp_path, fuzz.CacheInput(snapshot, seed.log))
    assert list(tmp_path.glob(SNAPSHOT_NAME + ".corrupt-*"))


def test_every_fuzz_target_counts_a_crash() -> None:
    """The bench's crash accounting works: an escaping exception is counted, not lost."""
    target = fuzz.Target("boom", "", [b""], lambda rng, v: v, _raise, lambda v: "")
    result = fuzz.run_mutate(target, 0.01, seed=0)
    assert result.crashes == result.executions > 0
    assert result.distinct_crashes[0]["signature"].startswith("RuntimeError")


def _raise(value: object) -> None:
    raise RuntimeError("boom")


def test_decoded_codec_tensors_match_their_header() -> None:
    for data in CODEC_SEEDS:
        tensor = TensorCodec().decode(data)
        assert tensor.dtype == np.float32 and np.isfinite(tensor).all()
        CODEC.execute(data)


def test_run_mutate_stops_after_the_given_executions() -> None:
    result = fuzz.run_mutate(WIRE, None, seed=0, executions=1000)
    assert result.executions == 1000 and result.crashes == 0


# -- the atheris engine's inputs (no atheris needed) ---------------------------------------


def _atheris_targets(bundle_target: fuzz.Target, tmp_path: Path) -> Iterator[fuzz.Target]:
    cache = fuzz.cache_target(tmp_path / "cache")
    try:
        yield from (WIRE, CODEC, bundle_target, cache)
    finally:
        cache.close()


def test_atheris_inputs_round_trip_and_any_bytes_stand_for_an_input(
    bundle_target: fuzz.Target, tmp_path: Path
) -> None:
    rng = random.Random(0)
    for target in _atheris_targets(bundle_target, tmp_path):
        for seed in target.seeds:
            data = fuzz.atheris_bytes(target, seed)
            assert fuzz.atheris_input(target, data) == seed, target.name
        for raw in (b"", b"\x90", b"\x92\xc0\xc0", rng.randbytes(100)):
            target.execute(fuzz.atheris_input(target, raw))  # only documented errors


def test_the_atheris_mutator_keeps_to_the_size_libfuzzer_allows(
    bundle_target: fuzz.Target, tmp_path: Path
) -> None:
    def byte_mutate(data: bytes, max_size: int) -> bytes:  # stands in for libFuzzer's
        return (data + b"\xff")[:max_size]

    for target in _atheris_targets(bundle_target, tmp_path):
        mutate = fuzz.atheris_mutator(target, byte_mutate)
        data = fuzz.atheris_bytes(target, target.seeds[0])
        for seed in range(30):
            max_size = len(data) + 4096
            data = mutate(data, max_size, seed)
            assert len(data) <= max_size
            target.execute(fuzz.atheris_input(target, data))


@pytest.mark.slow
def test_the_atheris_engine_runs_with_coverage_feedback() -> None:
    pytest.importorskip("atheris")
    result = fuzz.run_atheris("wire", seconds=60, executions=2000, seed=1)
    assert result.engine == "atheris" and result.executions == 2000 and result.crashes == 0
    # libFuzzer saw coverage of the instrumented decoder (it reports cov: 0 without).
    assert int(result.engine_notes.split("cov: ")[1].split()[0]) > 50, result.engine_notes
