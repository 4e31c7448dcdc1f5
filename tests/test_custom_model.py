"""Bring your own model: split points found and checked, bundles that carry the model,
every variant served, and bad input refused in one line (ccied prepare --model FILE)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ccied.peer.worker import ModelWorker
from ccied.pruning import MediaError, ModelError, StagedModel, find_clip, preprocess
from ccied.pruning.bundle import (
    BUILTIN_VARIANTS,
    MANIFEST_NAME,
    Bundle,
    Variant,
    load_bundle,
    open_bundle,
    write_bundle,
)
from ccied.pruning.custom import (
    Preprocessing,
    build_python_module,
    model_from_file,
    parse_model_spec,
    parse_normalize,
)
from ccied.pruning.prepare import folder_frames, write_atomically
from ccied.pruning.transfer import TransferConfig, fit_projection
from PIL import Image
from torch import nn

# A model with residual blocks and functional calls: no cut may fall inside a block.
RESIDUAL_NET = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block1 = Block(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block2 = Block(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(weights=WEIGHTS):
    torch.manual_seed(0)
    net = Net()
    if weights is not None:
        net.load_state_dict(torch.load(weights, weights_only=True))
    return net.eval()
"""

SIZE = 32
LABELS = ("ant", "bee", "cat", "dog", "eel")


class Chain(nn.Module):
    """A model whose forward is its children in order (TorchScript can be cut there)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript, deprecated upstream
        torch.jit.script(module).save(str(path))
    return path


@pytest.fixture
def net_file(tmp_path: Path) -> Path:
    """RESIDUAL_NET with trained-looking weights saved beside it (build() loads them)."""
    weights = tmp_path / "net-weights.pt"
    path = tmp_path / "net.py"
    path.write_text(RESIDUAL_NET.replace("WEIGHTS", "None"))
    module, _ = build_python_module(path, "build")
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01)
    torch.save(module.state_dict(), weights)
    path.write_text(RESIDUAL_NET.replace("WEIGHTS", repr(str(weights))))
    return path


@pytest.fixture
def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def _residual_model(net_file: Path, labels_file: Path | None = None) -> StagedModel:
    source = parse_model_spec(f"{net_file}:build")
    return model_from_file(source, Preprocessing(input_size=SIZE), labels_file)


def _answers(module: nn.Module, frames: list[np.ndarray], spec: StagedModel) -> list[int]:
    with torch.inference_mode():
        return [int(module(preprocess(f, spec.spec)).argmax()) for f in frames]


def test_a_traced_model_is_cut_only_where_one_tensor_crosses(
    net_file: Path, labels_file: Path
) -> None:
    model = _residual_model(net_file, labels_file)
    names = [p.name for p in model.split_points()]
    # After each block, never inside one (its input is alive until the addition);
    # the addition itself is a cut (only its sum goes on to the activation).
    assert names == [
        "stem.0",
        "stem",
        "block1.add",
        "block1",
        "down",
        "block2.add_1",
        "block2",
        "adaptive_avg_pool2d",
        "flatten",
    ]
    assert model.split_point("block2").output_shape == (16, 8, 8)
    assert model.split_point("flatten").output_shape == (16,)
    assert model.spec.class_names == LABELS
    assert model.origin is not None
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = model.origin.module(x)
        for point in model.split_points():
            head, tail = model.split(point.name)
            assert (tail(head(x)) - expected).abs().max() < 1e-4, point.name


def test_a_torchscript_model_is_cut_between_its_children(tmp_path: Path) -> None:
    torch.manual_seed(0)
    chain = Chain().eval()
    path = _script(chain, tmp_path / "chain.pt")
    model = model_from_file(parse_model_spec(str(path)), Preprocessing(input_size=SIZE))
    names = [p.name for p in model.split_points()]
    assert names == [f"features.{i}" for i in range(4)] + ["pool"]
    assert model.spec.class_names == ("0", "1", "2", "3", "4")  # no labels file: indices
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        for point in model.split_points():
            head, tail = model.split(point.name)
            assert (tail(head(x)) - chain(x)).abs().max() < 1e-4


def test_split_points_report_compute_from_every_operator(net_file: Path) -> None:
    """Shares come from the FLOP counter: a functional call counts as a module does."""
    model = _residual_model(net_file)
    shares = [p.compute_fraction for p in model.split_points()]
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] < 1
    assert model.split_point("block1").compute_fraction > model.split_point("stem").compute_fraction


UNTRACEABLE = """
import torch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))
def build():
    return Net()
"""
RAISES = "def build():\n    raise ValueError('no weights here')\n"
FLAT_INPUT = """
import torch
from torch import nn
def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 10), nn.ReLU(), nn.Linear(10, 5))
"""
TUPLE_OUT = """
import torch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return y, y
def build():
    return Net()
"""


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (UNTRACEABLE, "cannot be traced by torch.fx"),
        (RAISES, r"build\(\) raised ValueError: no weights here"),
        (FLAT_INPUT, "rejects a 2x3x32x32 input.*--input-size"),
        (TUPLE_OUT, r"logits of shape \(batch, classes\)"),
        ("import no_such_module\n", "running the file failed.*self-contained"),
        ("x = 1\n", "has no function 'build'"),
        ("def build():\n    return 42\n", "returned int, not a torch.nn.Module"),
    ],
)
def test_a_bad_model_file_is_one_line(tmp_path: Path, source: str, match: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(ModelError, match=match) as caught:
        model_from_file(parse_model_spec(f"{path}:build"), Preprocessing(input_size=SIZE))
    assert "\n" not in str(caught.value)


def test_bad_labels_torchscript_and_specs_are_one_line(
    tmp_path: Path, net_file: Path, labels_file: Path
) -> None:
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("one\ntwo\n\nthree\n")
    with pytest.raises(ModelError, match="has 3 class names but the model gives 5 outputs"):
        _residual_model(net_file, wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match="not a loadable TorchScript file"):
        model_from_file(parse_model_spec(str(garbage)), Preprocessing())
    residual, _ = build_python_module(net_file, "build")
    scripted = _script(residual, tmp_path / "residual.pt")  # forward is not its children
    with pytest.raises(ModelError, match=r"children of the TorchScript model.*FILE\.py:FACTORY"):
        model_from_file(parse_model_spec(str(scripted)), Preprocessing(input_size=SIZE))
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        parse_model_spec("nope")
    with pytest.raises(ModelError, match="name the factory"):
        parse_model_spec(str(net_file))
    with pytest.raises(ModelError, match="MEAN,STD"):
        parse_normalize("0.5")
    assert parse_normalize("0.5,0.25") == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ModelError, match="std must be above 0"):
        Preprocessing(std=(0.2, 0.0, 0.2))


def _variants(split: str) -> tuple[Variant, ...]:
    images = tuple(v for v in BUILTIN_VARIANTS if v.is_image)
    return (
        Variant(f"{split}-b8", split, 1.0, 8),
        Variant(f"{split}-raw", split, 1.0, None),
        *images,
    )


def _write(folder: Path, model: StagedModel) -> str:
    return write_bundle(folder, model, _variants("block1"), "block1-b8", {}, cache_split="stem")


def test_a_python_bundle_carries_everything_and_is_checked_before_it_runs(
    tmp_path: Path, net_file: Path, labels_file: Path, cat_pixels: np.ndarray
) -> None:
    model = _residual_model(net_file, labels_file)
    folder = tmp_path / "bundle"
    bundle_id = _write(folder, model)
    assert sorted(p.name for p in folder.iterdir()) == [
        "labels.txt",
        "manifest.json",
        "model.py",
        "weights.pt",
    ]
    identity = json.loads((folder / MANIFEST_NAME).read_text())["identity"]
    assert identity["format"] == 3 and identity["source"] == {"kind": "python", "factory": "build"}
    assert identity["preprocessing"]["input_size"] == SIZE
    assert identity["splits"][:2] == ["stem.0", "stem"]
    # The factory's own weights file is not needed: the peer calls build(weights=None)
    # and loads the bundle's state dict.
    Path(str(net_file).replace("net.py", "net-weights.pt")).unlink()
    loaded = open_bundle(str(folder))
    assert loaded.bundle_id == bundle_id
    assert loaded.model.spec.class_names == LABELS
    assert loaded.model.spec.weights_sha256 == model.spec.weights_sha256
    frames = [cat_pixels, cat_pixels[::-1].copy(), cat_pixels[:, ::-1].copy()]
    assert model.origin is not None and loaded.model.origin is not None
    assert _answers(loaded.model.origin.module, frames, loaded.model) == _answers(
        model.origin.module, frames, model
    )
    # Every file is checked against the manifest before model.py runs.
    (folder / "model.py").write_text("raise SystemExit('this must never run')\n")
    with pytest.raises(ModelError, match=r"model\.py: missing or altered"):
        load_bundle(folder)


def test_the_bundle_id_covers_weights_labels_and_preprocessing(
    tmp_path: Path, net_file: Path, labels_file: Path
) -> None:
    base = _write(tmp_path / "a", _residual_model(net_file, labels_file))
    assert _write(tmp_path / "b", _residual_model(net_file, labels_file)) == base
    assert _write(tmp_path / "c", _residual_model(net_file)) != base  # other labels
    other = model_from_file(
        parse_model_spec(f"{net_file}:build"),
        Preprocessing(input_size=SIZE, mean=(0.5, 0.5, 0.5)),
        labels_file,
    )
    assert _write(tmp_path / "d", other) != base
    heavier = _residual_model(net_file, labels_file)
    assert heavier.origin is not None
    with torch.no_grad():
        next(heavier.origin.module.parameters()).add_(1.0)
    assert _write(tmp_path / "e", heavier) != base


def test_every_variant_of_a_custom_bundle_runs_from_an_edge_to_a_cloud(
    tmp_path: Path, labels_file: Path, bikes_frames: list[np.ndarray], cat_pixels: np.ndarray
) -> None:
    """The worker's head on one side, its tail batch on the other, for each variant:
    the codec, a PCA-reduced transfer layer, raw floats, JPEG and lossless WebP."""
    torch.manual_seed(0)
    path = _script(Chain().eval(), tmp_path / "chain.pt")
    model = model_from_file(
        parse_model_spec(str(path)), Preprocessing(input_size=SIZE), labels_file
    )
    frames = [cat_pixels, *bikes_frames]
    projection = fit_projection(model, frames, TransferConfig(split="features.3", keep_ratio=0.5))
    variants = (
        Variant("features.3-k0.50-b8", "features.3", 0.5, 8),
        *_variants("features.3"),
    )
    write_bundle(
        tmp_path / "bundle",
        model,
        variants,
        variants[0].name,
        {variants[0].name: projection},
        cache_split="features.2",
    )
    bundle: Bundle = load_bundle(tmp_path / "bundle")
    assert model.origin is not None
    expected = _answers(model.origin.module, frames, model)

    async def serve() -> dict[str, list[int]]:
        edge, cloud = ModelWorker(bundle), ModelWorker(bundle)
        try:
            answers: dict[str, list[int]] = {}
            for variant in bundle.variants:
                heads = [
                    await edge.complete(await edge.head(f, variant.name, with_cache=True))
                    for f in frames
                ]
                results = await cloud.tail_batch(
                    variant.name, [(h.payload, h.encoding) for h in heads if h.payload is not None]
                )
                answers[variant.name] = [int(getattr(r, "label", -1)) for r in results]
            return answers
        finally:
            edge.close()
            cloud.close()

    answers = asyncio.run(serve())
    assert answers["features.3-raw"] == expected
    assert answers["lossless"] == expected
    for name, labels in answers.items():
        assert len(labels) == len(frames) and -1 not in labels, name
    assert sum(a == b for a, b in zip(answers["features.3-b8"], expected, strict=True)) >= 3


def _png(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_a_frames_folder_keeps_calibration_and_evaluation_apart(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / f"img{i}.png", i)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"")
    frames, fit = folder_frames(tmp_path, every=1, fit_fraction=0.6, max_frames=100)
    assert len(frames) == 5 and fit.tolist() == [True, True, True, False, False]
    # A video: its first 60% fit, the later frames are held out; videos come first.
    shutil.copyfile(find_clip("carphone_pristine.mp4"), tmp_path / "clip.mp4")
    frames, fit = folder_frames(tmp_path, every=20, fit_fraction=0.6, max_frames=100)
    assert len(frames) == 6 + 5
    assert fit.tolist() == [True] * 3 + [False] * 3 + [True, True, True, False, False]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing to decode")
    with pytest.raises(MediaError, match="no decodable image or video among 1 files"):
        folder_frames(empty, every=1, fit_fraction=0.6, max_frames=100)
    one = tmp_path / "one"
    one.mkdir()
    _png(one / "only.png", 0)
    with pytest.raises(MediaError, match="too few to keep calibration and evaluation apart"):
        folder_frames(one, every=1, fit_fraction=0.6, max_frames=100)


def test_a_failed_write_leaves_nothing_and_a_bundle_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def fail(folder: Path) -> str:
        (folder / "half-written").write_text("x")
        raise ModelError("failed halfway")

    with pytest.raises(ModelError, match="failed halfway"):
        write_atomically(out, fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("mine")
    with pytest.raises(ModelError, match="exists and is not a bundle folder"):
        write_atomically(tmp_path / "taken", fail)
    assert (tmp_path / "taken" / "precious.txt").read_text() == "mine"


# -- the command line ------------------------------------------------------------------


def _bad_input(tmp_path: Path, case: str, net_file: Path) -> list[str]:
    """The ``ccied prepare`` arguments of one kind of bad input."""
    if case == "untraceable":
        (tmp_path / "m.py").write_text(UNTRACEABLE)
        return ["--model", f"{tmp_path / 'm.py'}:build", "--input-size", "32"]
    if case == "factory raises":
        (tmp_path / "m.py").write_text(RAISES)
        return ["--model", f"{tmp_path / 'm.py'}:build"]
    if case == "label count":
        (tmp_path / "labels.txt").write_text("one\ntwo\nthree\n")
        return ["--model", f"{net_file}:build", "--input-size", "32", "--labels",
                str(tmp_path / "labels.txt")]  # fmt: skip
    if case == "torchscript":
        (tmp_path / "m.pt").write_bytes(b"\x00" * 64)
        return ["--model", str(tmp_path / "m.pt")]
    if case == "input size":
        (tmp_path / "m.py").write_text(FLAT_INPUT)
        return ["--model", f"{tmp_path / 'm.py'}:build", "--input-size", "32"]
    if case == "frames":
        (tmp_path / "frames").mkdir()
        (tmp_path / "frames" / "a.jpg").write_bytes(b"not a jpeg at all")
        return ["--model", f"{net_file}:build", "--input-size", "32", "--frames",
                str(tmp_path / "frames")]  # fmt: skip
    assert case == "registered with labels"
    return ["--labels", str(tmp_path / "any.txt")]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("untraceable", "cannot be traced by torch.fx"),
        ("factory raises", r"build\(\) raised ValueError"),
        ("label count", "3 class names but the model gives 5 outputs"),
        ("torchscript", "not a loadable TorchScript file"),
        ("input size", "rejects a 2x3x32x32 input"),
        ("frames", "no decodable image or video among 1 files"),
        ("registered with labels", "--labels: for a model from a file"),
    ],
)
def test_prepare_refuses_bad_input_in_one_line_and_writes_nothing(
    tmp_path: Path, net_file: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    from ccied.peer.cli import main

    out = tmp_path / "out" / "bundle"
    code = main(["prepare", *_bad_input(tmp_path, case, net_file), "--no-progress",
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ccied prepare: ") and err.count("\n") == 1, err
    assert message in err or re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_splits_lists_a_model_file_and_its_bundle(
    tmp_path: Path, net_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ccied.peer.cli import main

    assert main(["splits", "--model", f"{net_file}:build", "--input-size", "32"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["split", "output", "shape"]
    assert [line.split()[0] for line in table[1:]][:4] == ["stem.0", "stem", "block1.add", "block1"]
    assert table[4].split()[1:4] == ["8x16x16", "8192", "47.8%"]
    _write(tmp_path / "bundle", _residual_model(net_file))
    assert main(["splits", "--model", str(tmp_path / "bundle"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in listed][-1] == "flatten" and listed[-1]["output_shape"] == [16]
