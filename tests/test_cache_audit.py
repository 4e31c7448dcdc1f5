"""The cache that pays, in a real peer: thumbnail hits, the audit of hits, bad frames.

A real ``ccied peer`` process (no cloud: misses and audits run on its own
model), real photos, and a trusted neighbour's raw CurveZMQ socket that shares
entries it made up, as a compromised or buggy peer would.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from ccied import Client
from ccied.bench.cluster import PeerProcess
from ccied.cache import THUMBNAIL_KEY, thumbnail_feature
from ccied.cache.keys import THUMBNAIL_SIDE
from ccied.peer.wire import CacheShare, StatusReply
from ccied.pruning import StagedModel, preprocess
from ccied.pruning.media import thumbnail
from peers import keys_of, peer_keys, peer_process, raw_request

pytestmark = pytest.mark.slow

CCIED = [sys.executable, "-m", "ccied.peer.cli"]


@pytest.fixture(scope="module")
def audited(workdir: Path) -> Iterator[tuple[PeerProcess, PeerProcess]]:
    """An edge peer that audits every hit, and a trusted neighbour (only its keys are used)."""
    cam = peer_process(workdir, "auditcam", "edge", "--audit-rate", "1")
    liar = peer_process(workdir, "liar1", "edge")
    keys_of(cam).trust(keys_of(liar).load().public, liar.name)
    cam.start()
    try:
        cam.wait_ready()
        yield cam, liar
    finally:
        cam.stop()


def truth(model: StagedModel, pixels: np.ndarray) -> tuple[int, float]:
    with torch.inference_mode():
        probabilities = torch.softmax(model.full()(preprocess(pixels, model.spec)), dim=1)[0]
    return int(probabilities.argmax()), float(probabilities.max())


def share_wrong(cam: PeerProcess, liar: PeerProcess, pixels: np.ndarray, label: int) -> Any:
    """The liar shares an entry with the frame's own thumbnail key and a wrong, sure label."""
    with Client(cam.socket_path) as client:
        bundle = client.status()["bundle_id"]
    key = thumbnail_feature(thumbnail(pixels, 224, THUMBNAIL_SIDE))
    share = CacheShare(
        request_id=uuid.uuid4().hex,
        bundle_id=bundle,
        origins=[liar.name],
        labels=[label],
        confidences=[0.99],
        features=key[None],
        depth=THUMBNAIL_KEY,
    )
    return raw_request(cam.listen, share, peer_keys(liar, cam))


def cache_status(cam: PeerProcess) -> dict[str, Any]:
    with Client(cam.socket_path) as client:
        cache: dict[str, Any] = client.status()["cache"]
        return cache


def wait_for(cam: PeerProcess, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        cache = cache_status(cam)
        if done(cache):
            return cache
        assert time.monotonic() < deadline, cache
        time.sleep(0.05)


def test_the_audit_catches_a_wrong_shared_entry_and_stops_serving_it(
    audited: tuple[PeerProcess, PeerProcess], model: StagedModel
) -> None:
    cam, liar = audited
    photos = [skimage.data.coffee(), skimage.data.astronaut()]
    for round_, pixels in enumerate(photos, start=1):
        right, _ = truth(model, pixels)
        wrong = (right + 1) % 1000
        reply = share_wrong(cam, liar, pixels, wrong)
        assert isinstance(reply, StatusReply) and reply.status == {"accepted": 1}, reply
        # The liar's entry lands (the truth of the earlier round stays).
        wait_for(cam, lambda c, n=round_: c["depths"][0]["entries"] >= n)
        with Client(cam.socket_path) as client:
            lied = client.submit(pixels, f"photo{round_}")
        # The made-up entry answers once: the same thumbnail, a sure label.
        assert lied.source == "cache" and lied.label == wrong
        assert lied.cache_depth == THUMBNAIL_KEY
        cache = wait_for(cam, lambda c, n=round_: c["audit"]["wrong"] >= n)
        assert cache["audit"]["wrong"] == round_  # its own entries were never wrong
        assert cache["audit"]["origins"][liar.name] == {"checked": round_, "wrong": round_}
        # Caught: the entry is gone and the full model's answer took its place.
        with Client(cam.socket_path) as client:
            again = client.submit(pixels, f"photo{round_}-again")
        assert again.label == right, again
    # Twice wrong out of twice checked: the liar's entries are no longer taken.
    cache = cache_status(cam)
    assert cache["audit"]["refused_origins"] == [liar.name]
    assert cache["audit"]["tightened"] >= 1
    reply = share_wrong(cam, liar, skimage.data.rocket(), 3)
    assert isinstance(reply, StatusReply) and reply.status == {"accepted": 0}
    # Plain `ccied status` shows the audit and who is refused.
    shown = subprocess.run(
        [*CCIED, "status", "--socket", str(cam.socket_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "(rate 100.0%)" in shown.stdout and "checked" in shown.stdout
    assert f"entries refused from: {liar.name}" in shown.stdout
    assert "deeper-key lookups left out" in shown.stdout


def test_a_repeated_photo_is_answered_from_the_thumbnail_before_any_stage(
    audited: tuple[PeerProcess, PeerProcess], model: StagedModel
) -> None:
    cam, _ = audited
    pixels = skimage.data.chelsea()
    right, _ = truth(model, pixels)
    with Client(cam.socket_path) as client:
        results = [client.submit(pixels, f"cat{i}") for i in range(5)]
    assert results[0].source == "local" and results[0].cache_reason != ""
    assert all(r.source == "cache" and r.label == right for r in results[1:])
    assert {r.cache_depth for r in results[1:]} == {THUMBNAIL_KEY}
    assert all(r.bytes_sent == 0 and r.cache_reason == "" for r in results[1:])


@pytest.mark.parametrize("value", [0, 255])
def test_a_flat_frame_is_a_miss_not_an_error(
    audited: tuple[PeerProcess, PeerProcess], value: int
) -> None:
    cam, _ = audited
    flat = np.full((240, 320, 3), value, np.uint8)
    with Client(cam.socket_path) as client:
        first = client.submit(flat, "flat")
        second = client.submit(flat, "flat-again")
    # No key at the thumbnail: a flat frame never answers from it. The model
    # stage's key is a real tensor: an exact repeat of it may answer, the same.
    assert first.source == "local" and first.cache_reason != ""
    assert second.cache_depth != THUMBNAIL_KEY and second.label == first.label


@pytest.mark.parametrize("rate", ["1.5", "-0.1", "often"])
def test_an_audit_rate_outside_0_1_is_a_one_line_error(tmp_path: Path, rate: str) -> None:
    done = subprocess.run(
        [*CCIED, "peer", "--no-discovery", "--audit-rate", rate, "--socket", "none"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--audit-rate" in done.stderr and "Traceback" not in done.stderr
