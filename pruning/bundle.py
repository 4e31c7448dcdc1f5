"""Model bundles: what a peer serves, and what two peers must agree on to cooperate.

A bundle is a model plus the *variants* of its transfer layer that may cross
the network (split point, kept channels, codec bits), the cache's key depths
(a thumbnail of the input pixels, then the split whose tensor keys the cache
when the thumbnail is inconclusive), and each depth's calibrated hit rule. Several variants
ship in one bundle so the planner can switch between them per request, with no
reload, as the bandwidth moves.

A bundle folder (``ccied prepare --out DIR``) holds::

    manifest.json                 model, weights hash, variants, cache keys and rules, figures
    projection-<variant>.npz      fitted 1x1 reductions for variants with keep < 1

and, for a model from the user's files (format 3; a registered model is format 2)::

    labels.txt                    class names, one per line
    model.py + weights.pt         the factory's Python file and the module's state dict, or
    model.pt                      the TorchScript file

with the preprocessing (input size, mean, std), the factory's name and the
split points found in the manifest's identity. The bundle id is a hash of the
manifest's identity part and of every file it names, so two peers with the
same id compute the same thing; every file is checked against it before any
runs. Without a folder a peer serves :func:`builtin_bundle`: the default
variants, no reductions. Nothing here unpickles: JSON,
``np.load(allow_pickle=False)`` and ``torch.load(weights_only=True)``; a
``model.py`` is run as Python (see :mod:`ccied.pruning.custom`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import math
import shutil
import tokenize
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ccied.pruning.custom import (
    PYTHON,
    TORCHSCRIPT,
    ModelOrigin,
    Preprocessing,
    build_python_module,
    load_state,
    load_torchscript,
    looks_like_file,
    read_labels,
    staged_model,
    state_sha256,
)
from ccied.pruning.defaults import DEFAULT_CACHE_SPLIT, DEFAULT_MODEL
from ccied.pruning.errors import ModelError
from ccied.pruning.models import StagedModel, load_model
from ccied.pruning.transfer import TransferProjection

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# 2: the cache is keyed at several depths (a thumbnail first), one rule each.
BUNDLE_FORMAT = 2
# 3: format 2 plus the model itself, from the user's files (a registered model's
# bundle stays at 2, so its id, and the caches kept under it, do not change).
CUSTOM_BUNDLE_FORMAT = 3
LABELS_FILE = "labels.txt"
MODEL_SOURCE_FILE = "model.py"
WEIGHTS_FILE = "weights.pt"
TORCHSCRIPT_FILE = "model.pt"
MAX_MANIFEST_BYTES = 1 << 20
MAX_VARIANTS = 32
# The cache's first key: a 16x16 thumbnail of the input crop (ccied.cache.keys;
# named here too because pruning does not import the cache).
THUMBNAIL_SIDE = 16
THUMBNAIL_KEY = f"thumb{THUMBNAIL_SIDE}"
# The "split" of a JPEG variant: before the first stage.
INPUT_SPLIT = "input"


@dataclass(frozen=True)
class Variant:
    """One way to send a frame's intermediate tensor: where to cut and how to pack it."""

    name: str
    split: str
    keep_ratio: float = 1.0  # < 1 needs a fitted projection in the bundle folder
    bits: int | None = 8  # codec bits; None sends raw float32
    # Set for the cloud-only baselines: a JPEG of the model's input crop at this
    # quality, or the crop as a lossless WebP, crosses instead of a tensor
    # (split "input", bits None).
    jpeg_quality: int | None = None
    lossless: bool = False
    # Measured by `ccied prepare` / `ccied bench transfer` on held-out real frames:
    # top-1 agreement with the unpruned float32 model on all of them (``agreement``)
    # and on the decisive ones, where that model's top-1 probability is >= 0.5
    # (None: not measured; the planner then takes the all-frame figure for it).
    agreement: float | None = None
    bytes_per_frame: float | None = None
    agreement_decisive: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ModelError(f"variant {self.name}: keep_ratio must be in (0, 1]")
        if self.bits not in (None, 2, 4, 6, 8):
            raise ModelError(f"variant {self.name}: bits must be 2, 4, 6, 8 or raw")
        if self.jpeg_quality is not None and (
            self.split != INPUT_SPLIT or self.bits is not None or not 1 <= self.jpeg_quality <= 100
        ):
            raise ModelError(f"variant {self.name}: a JPEG variant has split 'input', no bits")
        if self.lossless and (
            self.split != INPUT_SPLIT or self.bits is not None or self.jpeg_quality is not None
        ):
            raise ModelError(f"variant {self.name}: a lossless variant has split 'input', no bits")
        if self.split == INPUT_SPLIT and self.jpeg_quality is None and not self.lossless:
            raise ModelError(f"variant {self.name}: the input travels only as an image")

    @property
    def is_image(self) -> bool:
        """The input crop crosses as an image (JPEG or lossless), no stage runs before."""
        return self.jpeg_quality is not None or self.lossless


# The method of a reduction trained by distillation (ccied.pruning.recover).
RECOVERED_METHOD = "distilled"


def variant_name(split: str, keep_ratio: float, bits: int | None, recovered: bool = False) -> str:
    """``blocks.11-b6``, ``blocks.11-k0.50-b2``, ``blocks.11-k0.50-b2-distilled``, ..."""
    keep = "" if keep_ratio >= 1.0 else f"-k{keep_ratio:.2f}"
    method = f"-{RECOVERED_METHOD}" if recovered else ""
    return f"{split}{keep}-{'raw' if bits is None else f'b{bits}'}{method}"


# Figures from `ccied prepare` (defaults) on the bundled clips: every 3rd frame,
# the last 40% of each clip held out (68 frames), this 2-core machine,
# 2026-11-22: median codec bytes per frame and top-1 agreement with the
# unpruned float32 model. With 68 frames one disagreement moves agreement by
# 0.015. blocks.11 at 6 bits is the default: it keeps every answer (1.000) at
# 4.8x fewer bytes than float32; blocks.14 at 4 bits is smaller (7.1x) but
# measured 0.971-0.985, around the 0.98 floor; blocks.7 at 8 bits moves work
# off a slow device when the link is fast. jpeg-q90 is the cloud-only baseline
# (the 224x224 input crop as a JPEG): 0.824, these clips' answers are fragile.
BUILTIN_VARIANTS = (
    Variant("blocks.11-b6", "blocks.11", 1.0, 6, agreement=1.0, bytes_per_frame=7850),
    Variant("blocks.7-b8", "blocks.7", 1.0, 8, agreement=1.0, bytes_per_frame=15428),
    Variant("blocks.14-b4", "blocks.14", 1.0, 4, agreement=0.971, bytes_per_frame=5288),
    Variant("blocks.11-raw", "blocks.11", 1.0, None, agreement=1.0, bytes_per_frame=37632),
    Variant(
        "jpeg-q90", INPUT_SPLIT, 1.0, None, jpeg_quality=90, agreement=0.824, bytes_per_frame=13582
    ),
    # The crop as a lossless WebP: the faithful cloud-only baseline, and an
    # option for ccied's planner on a fast uplink (42 KB median on the clips).
    Variant(
        "lossless", INPUT_SPLIT, 1.0, None, lossless=True, agreement=1.0, bytes_per_frame=42268
    ),
)
DEFAULT_VARIANT = "blocks.11-b6"


@dataclass(frozen=True)
class Bundle:
    model: StagedModel
    variants: tuple[Variant, ...]
    default_variant: str
    cache_split: str
    # Key depth -> HitRule fields calibrated by prepare (missing depths: defaults).
    cache_rules: dict[str, dict[str, float]] = field(default_factory=dict)
    projections: dict[str, TransferProjection] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    bundle_id: str = ""

    @property
    def cache_keys(self) -> tuple[str, ...]:
        """The cache's key depths, cheapest first."""
        return (THUMBNAIL_KEY, self.cache_split)

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        known = ", ".join(v.name for v in self.variants)
        raise ModelError(f"bundle has no variant {name!r}; it has: {known}")


def _identity(
    model: StagedModel,
    variants: tuple[Variant, ...],
    cache_split: str,
    files: dict[str, str],
) -> dict[str, Any]:
    """What two peers must share: model, weights, variants (without figures), files;
    for a model from the user's files also how it is built, fed and cut."""
    custom: dict[str, Any] = {}
    if model.origin is not None:
        custom = {
            "source": {"kind": model.origin.kind, "factory": model.origin.factory},
            "preprocessing": model.origin.preprocessing.as_json(),
            "splits": [point.name for point in model.split_points()],
        }
    return {
        "format": BUNDLE_FORMAT if model.origin is None else CUSTOM_BUNDLE_FORMAT,
        **custom,
        "model": model.spec.name,
        "weights_sha256": model.spec.weights_sha256,
        "cache_split": cache_split,
        "cache_keys": [THUMBNAIL_KEY, cache_split],
        "variants": [
            {
                "name": v.name,
                "split": v.split,
                "keep_ratio": v.keep_ratio,
                "bits": v.bits,
                **({"jpeg_quality": v.jpeg_quality} if v.jpeg_quality is not None else {}),
                **({"lossless": True} if v.lossless else {}),
            }
            for v in variants
        ],
        "files": dict(sorted(files.items())),
    }


def _bundle_id(identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:16]


def _check_variants(model: StagedModel, variants: tuple[Variant, ...], default: str) -> None:
    if not 0 < len(variants) <= MAX_VARIANTS:
        raise ModelError(f"a bundle needs 1..{MAX_VARIANTS} variants")
    if len({v.name for v in variants}) != len(variants):
        raise ModelError("variant names must be unique")
    for variant in variants:
        if variant.split != INPUT_SPLIT:
            model.split_point(variant.split)  # ModelError names the valid ones
    if default not in {v.name for v in variants}:
        raise ModelError(f"default variant {default!r} is not in the bundle")


def builtin_bundle(
    model_name: str = DEFAULT_MODEL,
    variants: tuple[Variant, ...] = BUILTIN_VARIANTS,
    default_variant: str = DEFAULT_VARIANT,
    cache_split: str = DEFAULT_CACHE_SPLIT,
) -> Bundle:
    """The bundle a peer serves without a prepared folder (no reduced variants)."""
    model = load_model(model_name)
    if any(v.keep_ratio < 1.0 for v in variants):
        raise ModelError("variants with keep_ratio < 1 need a prepared bundle folder")
    _check_variants(model, variants, default_variant)
    model.split_point(cache_split)
    identity = _identity(model, variants, cache_split, {})
    return Bundle(
        model=model,
        variants=variants,
        default_variant=default_variant,
        cache_split=cache_split,
        bundle_id=_bundle_id(identity),
    )


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bundle(
    folder: Path,
    model: StagedModel,
    variants: tuple[Variant, ...],
    default_variant: str,
    projections: dict[str, TransferProjection],
    cache_split: str = DEFAULT_CACHE_SPLIT,
    cache_rules: dict[str, dict[str, float]] | None = None,
    figures: dict[str, Any] | None = None,
) -> str:
    """Write a bundle folder; returns its bundle id."""
    _check_variants(model, variants, default_variant)
    folder.mkdir(parents=True, exist_ok=True)
    files = _write_model_files(folder, model)
    for variant in variants:
        if variant.keep_ratio < 1.0:
            projection = projections.get(variant.name)
            if projection is None or projection.split != variant.split:
                raise ModelError(f"variant {variant.name} needs a projection at {variant.split}")
            name = f"projection-{variant.name}.npz"
            arrays = {"method": np.array(projection.method), **projection.state()}
            with (folder / name).open("wb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **
            files[name] = _file_sha256(folder / name)
    identity = _identity(model, variants, cache_split, files)
    manifest = {
        "identity": identity,
        "bundle_id": _bundle_id(identity),
        "default_variant": default_variant,
        "variants_measured": [asdict(v) for v in variants],
        "cache_rules": cache_rules or {},
        "figures": figures or {},
    }
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(folder / MANIFEST_NAME)
    return str(manifest["bundle_id"])


def _write_model_files(folder: Path, model: StagedModel) -> dict[str, str]:
    """A model from the user's files: its labels and what builds it; {file: sha256}."""
    origin = model.origin
    if origin is None:
        return {}
    (folder / LABELS_FILE).write_text("\n".join(model.spec.class_names) + "\n", encoding="utf-8")
    names = [LABELS_FILE]
    if origin.kind == PYTHON:
        (folder / MODEL_SOURCE_FILE).write_bytes(origin.source)
        torch.save(origin.module.state_dict(), folder / WEIGHTS_FILE)
        names += [MODEL_SOURCE_FILE, WEIGHTS_FILE]
    else:
        try:
            shutil.copyfile(origin.path, folder / TORCHSCRIPT_FILE)
        except OSError as exc:
            raise ModelError(f"{origin.path}: cannot copy into the bundle ({exc})") from exc
        names.append(TORCHSCRIPT_FILE)
    return {name: _file_sha256(folder / name) for name in names}


def _model_files(kind: str) -> tuple[str, ...]:
    if kind == PYTHON:
        return (LABELS_FILE, MODEL_SOURCE_FILE, WEIGHTS_FILE)
    if kind == TORCHSCRIPT:
        return (LABELS_FILE, TORCHSCRIPT_FILE)
    raise ValueError(f"unknown model source {kind!r}")


@dataclass(frozen=True)
class _CustomIdentity:
    """The manifest's record of a model from the user's files."""

    kind: str
    factory: str | None
    preprocessing: Preprocessing
    splits: list[str]


def _custom_identity(identity: dict[str, Any]) -> _CustomIdentity:
    """Parse it; ValueError, KeyError or TypeError when malformed (ModelError for values)."""
    source = identity["source"]
    kind = str(source["kind"])
    _model_files(kind)
    factory = source.get("factory")
    if kind == PYTHON and not (isinstance(factory, str) and factory.isidentifier()):
        raise ValueError(f"factory {factory!r} is not a Python name")
    raw = identity["preprocessing"]
    mean, std = tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("preprocessing needs three means and three stds")
    preprocessing = Preprocessing(int(raw["input_size"]), mean, std)
    splits = identity["splits"]
    if not isinstance(splits, list):
        raise TypeError("splits is not a list")
    return _CustomIdentity(kind, factory if kind == PYTHON else None, preprocessing, splits)


def _custom_model(
    folder: Path, name: str, custom: _CustomIdentity, files: dict[str, str]
) -> StagedModel:
    """Check the model's files against the manifest, then build the model from them."""
    for file_name in _model_files(custom.kind):
        file = folder / file_name
        if file_name not in files or not file.is_file() or _file_sha256(file) != files[file_name]:
            raise ModelError(f"{file}: missing or altered (sha256 differs from the manifest)")
    labels = read_labels(folder / LABELS_FILE)
    if custom.kind == PYTHON:
        assert custom.factory is not None
        source = folder / MODEL_SOURCE_FILE
        module, text = build_python_module(source, custom.factory, in_bundle=True)
        load_state(module, folder / WEIGHTS_FILE)
        origin = ModelOrigin(PYTHON, source, custom.factory, text, module, custom.preprocessing)
        weights = state_sha256(module)
    else:
        module = load_torchscript(folder / TORCHSCRIPT_FILE)
        origin = ModelOrigin(
            TORCHSCRIPT, folder / TORCHSCRIPT_FILE, None, b"", module, custom.preprocessing
        )
        weights = files[TORCHSCRIPT_FILE]
    model = staged_model(module, origin, name, labels, weights)
    found = [point.name for point in model.split_points()]
    if found != custom.splits:
        raise ModelError(
            f"{folder}: this torch finds other split points in the model than the one that "
            "prepared the bundle did; run `ccied prepare` again"
        )
    return model


def load_bundle(folder: Path) -> Bundle:
    """Read and verify a bundle folder (ModelError for anything missing or altered)."""
    path = folder / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{folder}: not a bundle folder ({exc})") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    custom: _CustomIdentity | None = None
    try:
        manifest = json.loads(raw)
        identity = manifest["identity"]
        if identity["format"] not in (BUNDLE_FORMAT, CUSTOM_BUNDLE_FORMAT):
            raise ModelError(
                f"{path}: bundle format {identity['format']}, expected {BUNDLE_FORMAT} "
                f"or {CUSTOM_BUNDLE_FORMAT} (made by another version of ccied: run "
                "`ccied prepare` again)"
            )
        model_name = str(identity["model"])
        weights_sha256 = identity["weights_sha256"]
        if identity["format"] == CUSTOM_BUNDLE_FORMAT:
            custom = _custom_identity(identity)
        measured = {str(v["name"]): v for v in manifest["variants_measured"]}
        variants = tuple(
            Variant(
                name=str(v["name"]),
                split=str(v["split"]),
                keep_ratio=float(v["keep_ratio"]),
                bits=None if v["bits"] is None else int(v["bits"]),
                jpeg_quality=None if v.get("jpeg_quality") is None else int(v["jpeg_quality"]),
                lossless=v.get("lossless") is True,
                agreement=_optional_float(measured.get(v["name"], {}).get("agreement")),
                bytes_per_frame=_optional_float(measured.get(v["name"], {}).get("bytes_per_frame")),
                agreement_decisive=_optional_float(
                    measured.get(v["name"], {}).get("agreement_decisive")
                ),
            )
            for v in identity["variants"]
        )
        default_variant = str(manifest["default_variant"])
        cache_split = str(identity["cache_split"])
        files = {str(k): str(v) for k, v in identity["files"].items()}
        cache_rules = _cache_rules(manifest.get("cache_rules"))
        figures = manifest.get("figures") or {}
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        # AttributeError: a field of the wrong JSON type ("files": []); OverflowError:
        # int(Infinity) or float(10**400); RecursionError: JSON nested too deep.
        raise ModelError(f"{path}: malformed manifest ({exc!r})") from exc
    if _bundle_id(identity) != manifest.get("bundle_id"):
        raise ModelError(f"{path}: bundle id does not match its contents (edited by hand?)")
    if custom is None:
        model = load_model(model_name)
    else:
        model = _custom_model(folder, model_name, custom, files)
    if weights_sha256 != model.spec.weights_sha256:
        raise ModelError(f"{path}: prepared for other weights of {model_name}")
    _check_variants(model, variants, default_variant)
    model.split_point(cache_split)
    projections = {}
    for variant in variants:
        if variant.keep_ratio >= 1.0:
            continue
        name = f"projection-{variant.name}.npz"
        file = folder / name
        if name not in files or not file.is_file() or _file_sha256(file) != files[name]:
            raise ModelError(f"{file}: missing or altered (sha256 differs from the manifest)")
        try:
            with np.load(file, allow_pickle=False) as arrays:
                state = {key: arrays[key] for key in arrays.files if key != "method"}
                method = str(arrays["method"])
        # BadZipFile, EOFError, zlib.error: a damaged .npz whose hash was updated with it;
        # RuntimeError (NotImplementedError too), LZMAError: zip flags or a compression
        # method it cannot read (encrypted, patched, unknown, a broken LZMA member);
        # SyntaxError, TokenError: numpy parses each .npy header as a Python literal;
        # MemoryError: a header that claims an array too large to hold.
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            SyntaxError,
            MemoryError,
            RuntimeError,
            lzma.LZMAError,
            tokenize.TokenError,
            zipfile.BadZipFile,
            zlib.error,
        ) as exc:
            raise ModelError(f"{file}: unreadable projection ({exc})") from exc
        projections[variant.name] = TransferProjection.from_state(variant.split, method, state)
    return Bundle(
        model=model,
        variants=variants,
        default_variant=default_variant,
        cache_split=cache_split,
        cache_rules=cache_rules,
        projections=projections,
        figures=figures if isinstance(figures, dict) else {},
        path=folder,
        bundle_id=_bundle_id(identity),
    )


def open_bundle(model_or_folder: str) -> Bundle:
    """``--model``: a registered model name (built-in variants) or a prepared bundle folder."""
    folder = Path(model_or_folder).expanduser()
    if folder.is_dir():
        return load_bundle(folder)
    if looks_like_file(model_or_folder):
        raise ModelError(
            f"{model_or_folder}: a model from a file is served from its bundle: "
            f"`ccied prepare --model {model_or_folder} --out DIR`, then --model DIR"
        )
    return builtin_bundle(model_or_folder)


def _cache_rules(value: object) -> dict[str, dict[str, float]]:
    """The manifest's per-depth rules: {depth: {field: number}}; ValueError if malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("cache_rules is not a map")
    rules: dict[str, dict[str, float]] = {}
    for depth, fields in value.items():
        if not isinstance(fields, dict):
            raise ValueError(f"cache rule of {depth!r} is not a map")
        rules[str(depth)] = {}
        for name, number in fields.items():
            if isinstance(number, bool) or not isinstance(number, int | float):
                raise ValueError(f"cache rule {depth}.{name} is not a number")
            if not math.isfinite(number):
                raise ValueError(f"cache rule {depth}.{name} is not finite")
            rules[str(depth)][str(name)] = number
    return rules


def _optional_float(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"non-finite figure {value!r}")
    return number
