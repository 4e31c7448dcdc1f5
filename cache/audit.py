"""The cache's self-audit: a share of hits re-checked by the full model, off the critical path.

Pure bookkeeping (the peer runs the full model and reports back here): how
many hits were checked, how many were wrong, a 95% upper bound on the false-hit
rate, agreement on decisive frames and on all frames, and per origin (the peer
that made the entry) how its entries fared. It tells the caller what to do:

* every wrong hit: drop the entry that answered;
* a wrong hit while the upper bound is above the target: tighten the rule of
  the depth that answered (:meth:`ccied.cache.HitRule.tightened`);
* an origin other than this peer whose checked entries keep being wrong
  (``ORIGIN_MIN_WRONG`` wrong, more than ``ORIGIN_MAX_WRONG_SHARE`` of its
  checks): stop accepting its entries and drop those it sent.

Tightening only on a wrong hit, not on the bound alone: with no failure the
bound is 3/n (the rule of three), so a target of 1% needs 300 clean checks
before the bound can pass it; tightening on the bound alone would shut a
healthy cache down for its first 6,000 hits at the default rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ccied.cache.policy import upper_bound

DEFAULT_AUDIT_RATE = 0.05  # 1 hit in 20
# Hits must agree with the full model on >= 0.99 of them (the cache's target).
DEFAULT_TARGET_FALSE_HIT_RATE = 0.01
ORIGIN_MIN_WRONG = 2
ORIGIN_MAX_WRONG_SHARE = 0.25
# DESIGN.md: a frame is decisive when the full model's top-1 probability >= 0.5.
DECISIVE_CONFIDENCE = 0.5


@dataclass
class _Tally:
    checked: int = 0
    wrong: int = 0


@dataclass(frozen=True)
class Verdict:
    """What to do after one audited hit."""

    wrong: bool
    drop_entry: bool
    tighten: bool
    refuse_origin: bool


@dataclass
class Audit:
    """Counts audited hits and decides on wrong ones. Not thread-safe: one owner (the loop)."""

    rate: float = DEFAULT_AUDIT_RATE
    target_false_hit_rate: float = DEFAULT_TARGET_FALSE_HIT_RATE
    own_name: str = ""
    checked: int = 0
    wrong: int = 0
    decisive_checked: int = 0
    decisive_wrong: int = 0
    tightened: int = 0
    pending: int = 0
    origins: dict[str, _Tally] = field(default_factory=dict)
    refused_origins: set[str] = field(default_factory=set)
    _credit: float = -1.0  # set in __post_init__: the first hit is checked, then 1 in 1/rate

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"audit rate must be in [0, 1], got {self.rate}")
        if not 0.0 < self.target_false_hit_rate < 1.0:
            raise ValueError("the target false-hit rate must be in (0, 1)")
        self._credit = 1.0 - self.rate

    def should_check(self) -> bool:
        """Whether to audit this hit: deterministic, one in ``1 / rate``."""
        if self.rate <= 0.0:
            return False
        self._credit += self.rate
        if self._credit >= 1.0 - 1e-9:  # the tolerance absorbs the sum's rounding
            self._credit -= 1.0
            return True
        return False

    def record(self, origin: str, wrong: bool, full_confidence: float) -> Verdict:
        """One audited hit: the entry's origin, whether it was wrong, the full model's top-1."""
        self.checked += 1
        self.wrong += int(wrong)
        if full_confidence >= DECISIVE_CONFIDENCE:
            self.decisive_checked += 1
            self.decisive_wrong += int(wrong)
        tally = self.origins.setdefault(origin, _Tally())
        tally.checked += 1
        tally.wrong += int(wrong)
        if not wrong:
            return Verdict(False, False, False, False)
        tighten = self.upper_bound() > self.target_false_hit_rate
        self.tightened += int(tighten)
        refuse = (
            origin != self.own_name
            and origin not in self.refused_origins
            and tally.wrong >= ORIGIN_MIN_WRONG
            and tally.wrong / tally.checked > ORIGIN_MAX_WRONG_SHARE
        )
        if refuse:
            self.refused_origins.add(origin)
        return Verdict(True, True, tighten, refuse)

    def refuses(self, origin: str) -> bool:
        return origin in self.refused_origins

    def upper_bound(self) -> float:
        return upper_bound(self.wrong, self.checked)

    def stats(self) -> dict[str, Any]:
        def share(wrong: int, checked: int) -> float | None:
            return round(1 - wrong / checked, 4) if checked else None

        return {
            "rate": self.rate,
            "checked": self.checked,
            "wrong": self.wrong,
            "pending": self.pending,
            "false_hit_rate": round(self.wrong / self.checked, 4) if self.checked else None,
            "false_hit_upper_95": round(self.upper_bound(), 4),
            "target_false_hit_rate": self.target_false_hit_rate,
            "fidelity_decisive": share(self.decisive_wrong, self.decisive_checked),
            "fidelity_all": share(self.wrong, self.checked),
            "decisive_checked": self.decisive_checked,
            "tightened": self.tightened,
            "origins": {
                name: {"checked": t.checked, "wrong": t.wrong} for name, t in self.origins.items()
            },
            "refused_origins": sorted(self.refused_origins),
        }
