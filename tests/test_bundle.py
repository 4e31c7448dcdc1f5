"""Model bundles: identity, folders that round-trip, refusal of altered ones.

The variant choice among a bundle's variants: tests/test_policy.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ccied.pruning import ModelError, StagedModel
from ccied.pruning.bundle import (
    BUILTIN_VARIANTS,
    DEFAULT_VARIANT,
    MANIFEST_NAME,
    Variant,
    builtin_bundle,
    load_bundle,
    write_bundle,
)
from ccied.pruning.transfer import fit_projection_from_activations


def test_builtin_bundle_identity_is_stable_and_depends_on_the_variants() -> None:
    a = builtin_bundle()
    assert a.bundle_id == builtin_bundle().bundle_id
    assert a.default_variant == DEFAULT_VARIANT
    other = builtin_bundle(variants=BUILTIN_VARIANTS[:2], default_variant="blocks.11-b6")
    assert other.bundle_id != a.bundle_id
    with pytest.raises(ModelError, match="no split point"):
        builtin_bundle(variants=(Variant("x", "blocks.99"),), default_variant="x")


def test_a_bundle_folder_round_trips_and_refuses_tampering(
    tmp_path: Path, model: StagedModel
) -> None:
    activations = torch.randn(64, 192, 7, 7)
    projection = fit_projection_from_activations("blocks.11", activations, 0.5)
    reduced = Variant("blocks.11-k0.50-b8", "blocks.11", 0.5, 8, agreement=0.9)
    variants = (reduced, *BUILTIN_VARIANTS)
    bundle_id = write_bundle(
        tmp_path, model, variants, reduced.name, {reduced.name: projection},
        cache_rules={"thumb16": {"threshold_l2": 0.5}, "blocks.4": {"vote_margin": 2}},
    )  # fmt: skip
    loaded = load_bundle(tmp_path)
    assert loaded.bundle_id == bundle_id != builtin_bundle().bundle_id
    assert loaded.variant(reduced.name).agreement == 0.9
    np.testing.assert_array_equal(loaded.projections[reduced.name].encoder, projection.encoder)
    assert loaded.cache_rules == {"thumb16": {"threshold_l2": 0.5}, "blocks.4": {"vote_margin": 2}}
    assert loaded.cache_keys == ("thumb16", "blocks.4")

    npz = tmp_path / f"projection-{reduced.name}.npz"
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="altered"):
        load_bundle(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["identity"]["variants"][0]["bits"] = 2
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="does not match its contents"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelError, match="malformed manifest"):
        load_bundle(tmp_path)
    with pytest.raises(ModelError, match="not a bundle folder"):
        load_bundle(tmp_path / "nowhere")


def test_a_bundle_of_an_older_format_or_with_a_malformed_cache_rule_is_refused(
    tmp_path: Path, model: StagedModel
) -> None:
    write_bundle(tmp_path, model, BUILTIN_VARIANTS, DEFAULT_VARIANT, {})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["cache_rules"] = {"thumb16": {"threshold_l2": "far"}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="malformed manifest"):
        load_bundle(tmp_path)
    manifest["cache_rules"] = {}
    manifest["identity"]["format"] = 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="run `ccied prepare` again"):
        load_bundle(tmp_path)


def test_the_thumbnail_key_is_named_alike_in_the_bundle_and_the_cache() -> None:
    from ccied.cache import keys
    from ccied.pruning import bundle

    assert bundle.THUMBNAIL_KEY == keys.THUMBNAIL_KEY
    assert bundle.THUMBNAIL_SIDE == keys.THUMBNAIL_SIDE
