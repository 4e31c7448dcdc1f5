"""A model ccied has never seen, end to end: trained in seconds (docs/examples), prepared
from its Python file and from TorchScript with the user's own frames, served by a cloud
and an edge, answering as the model itself does on the same frames."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ccied.bench.cluster import PeerProcess, free_tcp_port, running
from ccied.peer.client import Client
from ccied.pruning.bundle import load_bundle
from ccied.pruning.media import center_crop, load_image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "fashion_classifier.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")
FRAMES = 40


def _ccied(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ccied.peer.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    out = workdir / "fashion"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(out), "--train", "4000", "--frames", str(FRAMES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def reference(trained: Path) -> Iterator[tuple[list[np.ndarray], list[int], list[float]]]:
    """The frames and the model's own answers on them, computed here without ccied's
    bundle: the example's class with its trained weights, the crop and normalisation
    written out."""
    spec = importlib.util.spec_from_file_location("fashion_reference", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["fashion_reference"] = example
    spec.loader.exec_module(example)
    model = example.build(str(trained / "weights.pt"))
    frames = [load_image(path) for path in sorted((trained / "frames").iterdir())]
    crops = np.stack([center_crop(frame, 28) for frame in frames])
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0 - example.MEAN) / example.STD
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)
    yield frames, probs.argmax(1).tolist(), probs.max(1).values.tolist()
    sys.modules.pop("fashion_reference", None)


@pytest.fixture(scope="module", params=["python", "torchscript"])
def bundle(request: pytest.FixtureRequest, trained: Path, workdir: Path) -> Path:
    spec = f"{EXAMPLE}:build" if request.param == "python" else str(trained / "model.pt")
    out = workdir / f"bundle-{request.param}"
    done = _ccied(
        "prepare", "--model", spec, "--labels", str(trained / "labels.txt"),
        "--input-size", "28", "--normalize", "0.286,0.353", "--frames", str(trained / "frames"),
        "--no-progress", "--out", str(out),
        env={"FASHION_WEIGHTS": str(trained / "weights.pt")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "agreement" in done.stdout and "features.7-b8" in done.stdout
    return out


def test_both_bundles_carry_the_model_and_list_its_split_points(
    trained: Path, workdir: Path, bundle: Path
) -> None:
    loaded = load_bundle(bundle)
    assert loaded.model.spec.class_names[9] == "Ankle boot"
    assert loaded.model.spec.input_size == 28 and loaded.model.spec.mean == (0.286,) * 3
    assert loaded.figures["frames"]["source"] == str(trained / "frames")
    assert loaded.figures["frames"]["fit"] + loaded.figures["frames"]["held_out"] == FRAMES
    done = _ccied("splits", "--model", str(bundle), "--json")
    assert done.returncode == 0, done.stderr
    points = {p["name"]: p for p in json.loads(done.stdout)}
    assert points["features.7"]["output_shape"] == [16, 7, 7]
    others = [p for p in workdir.iterdir() if p.name.startswith("bundle-") and p != bundle]
    for other in others:  # the other kind, when prepared: another model file, another id
        assert load_bundle(other).bundle_id != loaded.bundle_id


def test_a_cloud_and_an_edge_answer_as_the_model_itself(
    bundle: Path,
    workdir: Path,
    reference: tuple[list[np.ndarray], list[int], list[float]],
) -> None:
    frames, labels, confidences = reference
    raw = f"{load_bundle(bundle).model.split_point('features.7').name}-raw"
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    model = ["--model", str(bundle)]
    cloud = PeerProcess("fcloud", "cloud", address, workdir / "fcloud.sock", extra_args=model)
    edge = PeerProcess(
        "fcam",
        "edge",
        "none",
        workdir / "fcam.sock",
        extra_args=[*model, "--cloud", address, "--variant", raw, "--always-offload"],
    )
    with running([cloud, edge]), Client(edge.socket_path) as client:
        first = [client.submit(f, f"f{i}") for i, f in enumerate(frames)]
        second = [client.submit(f, f"again{i}") for i, f in enumerate(frames)]
    for result, label, confidence in zip(first + second, labels * 2, confidences * 2, strict=True):
        if result.source != "cache":  # the raw tensor at the cloud: the model's own answer
            assert result.label == label and abs(result.confidence - confidence) < 1e-3
    # A hit answers with a near frame's answer. The thumbnail's rule was measured on
    # other models' frames (it held on these: every hit agreed here); one wrong hit in a
    # first pass, repeated by its exact copy in the second, is the cache's 0.99 target.
    wrong = [i for i, r in enumerate(first + second) if r.label != labels[i % len(frames)]]
    assert len({i % len(frames) for i in wrong}) <= 1, wrong
    sources = {r.source for r in first}
    assert "cloud" in sources and sources <= {"cloud", "cache"}, sources
    assert all(r.variant == raw for r in first if r.source == "cloud")
    # Exact repeats answer from the cache (a repeat answers whatever its confidence).
    assert sum(r.source == "cache" for r in second) >= len(frames) // 2


def test_a_model_from_a_file_gets_a_recovered_layer_from_unlabelled_frames(
    trained: Path, workdir: Path
) -> None:
    # `--recover` on the user's own footage and normalisation (no labels): half of
    # the transfer layer's channels at 2 bits, trained by distillation.
    out = workdir / "bundle-recovered"
    done = _ccied(
        "prepare", "--model", f"{EXAMPLE}:build", "--labels", str(trained / "labels.txt"),
        "--input-size", "28", "--normalize", "0.286,0.353", "--frames", str(trained / "frames"),
        "--recover", "--recover-steps", "100", "--no-progress", "--out", str(out),
        env={"FASHION_WEIGHTS": str(trained / "weights.pt")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(out)
    variant = bundle.variant(bundle.default_variant)
    assert variant.name.endswith("-k0.50-b2-distilled")
    assert bundle.projections[variant.name].method == "distilled"
    full = bundle.variant(next(v.name for v in bundle.variants if v.name.endswith("-raw")))
    assert variant.bytes_per_frame is not None and full.bytes_per_frame is not None
    assert variant.bytes_per_frame < full.bytes_per_frame / 10
    # Measured 0.96 on all held-out frames with 200 frames (README); 0.75 leaves room
    # for this test's 40 frames while a broken augmentation or layer fails it.
    assert variant.agreement is not None and variant.agreement >= 0.75
