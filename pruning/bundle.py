"""Model bundle identity: which model, weights, split and tensor format a peer serves.

Two peers can exchange intermediate tensors only when they agree on all of
these, so the bundle id is a hash over them and travels in every peer message.
The transfer-layer issue extends this into a bundle folder with a manifest.
"""

from __future__ import annotations

import hashlib
import json

from ccied.pruning.models import StagedModel

# Format of the tensor that crosses the network at the split (no codec yet).
TENSOR_FORMAT = "float32-raw"


def bundle_id(model: StagedModel, split: str, tensor_format: str = TENSOR_FORMAT) -> str:
    """A short content hash naming (model, weights, split point, tensor format)."""
    point = model.split_point(split)
    identity = {
        "model": model.spec.name,
        "weights_sha256": model.spec.weights_sha256,
        "split": point.name,
        "shape": list(point.output_shape),
        "tensor_format": tensor_format,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()[:16]
