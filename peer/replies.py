"""The one place an answer to a frame or a tensor is built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ccied.peer.wire import InferResult, Source


@dataclass(frozen=True)
class Replies:
    """Builds :class:`InferResult` values: class names from this peer's model, and this
    peer's name as ``served_by`` unless another peer answered."""

    class_names: Sequence[str]
    own_name: str

    def __call__(
        self,
        request_id: str,
        label: int,
        confidence: float,
        source: Source,
        served_by: str = "",
        **fields: Any,
    ) -> InferResult:
        return InferResult(
            request_id=request_id,
            label=label,
            class_name=self.class_names[label],
            confidence=confidence,
            source=source,
            served_by=served_by or self.own_name,
            **fields,
        )


__all__ = ["Replies"]
