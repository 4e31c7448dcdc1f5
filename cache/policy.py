"""When may the cache answer? The hit rule, and its calibration on real frames.

A semantic cache's failure is a wrong answer served with confidence. A hit
needs three things:

1. a *decisive* entry: only an entry whose own full-model answer had a top-1
   probability of at least ``answer_floor`` may answer. Entries under the
   floor stay in the index: they vote, so they can veto, but never answer;
2. close enough for how sure it was: an entry of confidence ``c`` reaches
   ``threshold_l2 * (c - floor) / (1 - floor)`` (L2 distance of the normalised
   keys). An entry just over the floor answers only near-repeats; a sure one
   reaches the whole threshold. Measured on the bundled clips with a second
   camera 2 pixels off the first: with one reach for all, every wrong hit came
   from entries at 0.51-0.63 ("bow tie" answering frames the model called
   "Windsor tie"), and hits agreed on 0.96-0.98; with the reach scaled, 1.00 at
   about the same hit rate on pans over photos (0.46 against 0.48);
3. agreement: no entry closer than the answering one says otherwise, and
   among the k nearest entries within ``vote_radius_l2`` the answering label
   leads every other label by ``vote_margin`` votes. (Without the first part,
   at ``blocks.4`` a sure "suit" two frames back answered a frame whose three
   closer entries said "parking meter", "abaya" and "chain".)

The floor is what makes the cache pay. On frames where the model guesses
(bikes.mp4: 8% of frames reach 0.5) its own answer flips between two frames
3 pixels apart, so no key at any depth predicts it; asking hits to agree on
those frames left every key depth at 0.00-0.03 second-pass hits. With the
floor, every depth from a 16x16 thumbnail to ``blocks.15`` reached 0.42-0.45
(the decisive share) at 0.99-1.00 agreement (DESIGN.md, 2026-11-30).

An exact match (distance under ``exact_l2``) answers whatever its confidence:
the same key from the same pixels is the same answer the model gave before.

The numbers are chosen per key depth by :func:`calibrate` on calibration
frames in stream order, so that hits agree with the full model on at least
the target share (default 99%), and stored in the model bundle.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

DEFAULT_K = 5
# Swept with `ccied bench cache` (2026-11-30, this 2-core box, every 2nd frame of
# the clips, floor 0.5, margin 1). blocks.4 at 0.25: clips 0.26 hits, pans
# second pass 0.33, near camera 0.17, every hit agreeing; 0.30 let a wrong hit
# through on the near camera (0.98), 0.40 two (0.97). The thumbnail's distances
# are larger: 0.6 gave clips 0.22, pans 0.46 (the decisive share is 0.525),
# near camera 0.21, every hit agreeing; 0.7 let one through (0.97).
DEFAULT_THRESHOLD_L2 = 0.25
THUMBNAIL_THRESHOLD_L2 = 0.6
DEFAULT_VOTE_MARGIN = 1
DEFAULT_MIN_INSERT_CONFIDENCE = 0.0
DEFAULT_EXACT_L2 = 1e-3
# The measurement and DESIGN.md's "decisive": top-1 probability >= 0.5.
DEFAULT_ANSWER_FLOOR = 0.5
# On the bundled clips the nearest frame of the same clip is 0.07-0.14 away
# (medians, blocks.11), of another clip 0.41-0.47; a radius of 0.2 kept every hit
# that unlimited voting had while 0.1 lost a quarter. A miss whose nearest entry
# is inside the radius is *inconclusive*: a deeper key may settle it.
DEFAULT_VOTE_RADIUS_L2 = 0.2
DEFAULT_TARGET_FIDELITY = 0.99
# Entries a cache keeps before it evicts (ccied.cache.semantic; here with the other
# defaults so that the command line's help names it without loading FAISS).
DEFAULT_CAPACITY = 20_000


class MissReason(StrEnum):
    """Why a lookup did not answer (shown per frame and counted in status)."""

    EMPTY = "empty"  # nothing in the cache yet
    FAR = "no_neighbour"  # the nearest entry is beyond the threshold
    NOT_DECISIVE = "not_decisive"  # close entries, none sure enough to answer
    DISAGREE = "disagree"  # close entries vote for different answers
    NO_KEY = "no_key"  # the frame gives no usable key (flat, NaN)
    SKIPPED = "skipped"  # the planner skipped the key: it would cost more than it saves


@dataclass(frozen=True)
class HitRule:
    """When an entry may answer: distance, decisiveness, agreement."""

    threshold_l2: float = DEFAULT_THRESHOLD_L2
    vote_margin: int = DEFAULT_VOTE_MARGIN
    k: int = DEFAULT_K
    exact_l2: float = DEFAULT_EXACT_L2
    min_insert_confidence: float = DEFAULT_MIN_INSERT_CONFIDENCE
    # Only entries this close vote (never less than the threshold): far
    # entries belong to other scenes and must not outvote a close one.
    vote_radius_l2: float = DEFAULT_VOTE_RADIUS_L2
    answer_floor: float = DEFAULT_ANSWER_FLOOR

    def __post_init__(self) -> None:
        numbers = (self.threshold_l2, self.exact_l2, self.vote_radius_l2, self.answer_floor)
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in numbers):
            raise ValueError(f"invalid hit rule {self}")
        if not (self.threshold_l2 >= 0 and self.exact_l2 >= 0 and self.k >= 1):
            raise ValueError(f"invalid hit rule {self}")
        if self.vote_margin < 1 or not 0 <= self.min_insert_confidence <= 1:
            raise ValueError(f"invalid hit rule {self}")
        if not 0 <= self.answer_floor <= 1:
            raise ValueError(f"invalid hit rule {self}: answer_floor must be in [0, 1]")

    def reach_l2(self, confidence: float) -> float:
        """How far an entry whose own answer had this confidence may answer."""
        if confidence < self.answer_floor:
            return -1.0
        if self.answer_floor >= 1.0:
            return self.threshold_l2
        return self.threshold_l2 * (confidence - self.answer_floor) / (1.0 - self.answer_floor)

    def tightened(self, factor: float = 0.8) -> HitRule:
        """A stricter rule after an audited wrong hit: closer, surer, no exact shortcut lost."""
        return HitRule(
            threshold_l2=self.threshold_l2 * factor,
            vote_margin=self.vote_margin,
            k=self.k,
            exact_l2=self.exact_l2,
            min_insert_confidence=self.min_insert_confidence,
            vote_radius_l2=self.vote_radius_l2,
            answer_floor=min(0.95, self.answer_floor + (1 - self.answer_floor) * (1 - factor)),
        )


@dataclass(frozen=True)
class Decision:
    """The outcome of one lookup, before any entry bookkeeping."""

    hit: bool
    label: int  # -1 on a miss with no close neighbour
    distance: float  # to the nearest entry (inf when the cache is empty)
    votes: dict[int, int] = field(default_factory=dict)  # label -> close neighbours voting it
    exact: bool = False
    answerer: int = -1  # index (in the k nearest) of the entry that answered
    reason: str = ""  # a MissReason on a miss, "" on a hit
    inconclusive: bool = False  # a miss with a neighbour inside the vote radius


def decide(
    distances: Sequence[float],
    labels: Sequence[int],
    rule: HitRule,
    confidences: Sequence[float] | None = None,
) -> Decision:
    """Apply the hit rule to the k nearest entries (ascending distances, labels, confidences).

    Without ``confidences`` every entry counts as decisive (the rule of a
    cache that keeps only decisive entries).
    """
    if not distances:
        return Decision(hit=False, label=-1, distance=math.inf, reason=MissReason.EMPTY)
    sure = [1.0] * len(distances) if confidences is None else list(confidences)
    nearest = float(distances[0])
    if nearest <= rule.exact_l2:
        return Decision(True, int(labels[0]), nearest, {int(labels[0]): 1}, True, 0)
    radius = max(rule.vote_radius_l2, rule.threshold_l2)
    inconclusive = nearest <= radius
    if nearest > rule.threshold_l2:
        return Decision(False, -1, nearest, reason=MissReason.FAR, inconclusive=inconclusive)
    answerer = next(
        (
            i
            for i, (d, c) in enumerate(zip(distances, sure, strict=True))
            if c >= rule.answer_floor and d <= rule.reach_l2(c)
        ),
        -1,
    )
    if answerer < 0:
        return Decision(False, -1, nearest, reason=MissReason.NOT_DECISIVE, inconclusive=True)
    votes = Counter(
        int(label) for distance, label in zip(distances, labels, strict=True) if distance <= radius
    )
    label = int(labels[answerer])
    others = max((n for other, n in votes.items() if other != label), default=0)
    closer_agree = all(int(other) == label for other in labels[:answerer])
    if closer_agree and votes[label] - others >= rule.vote_margin:
        return Decision(True, label, nearest, dict(votes), False, answerer)
    return Decision(
        False, label, nearest, dict(votes), reason=MissReason.DISAGREE, inconclusive=True
    )


@dataclass(frozen=True)
class CalibrationPoint:
    threshold_l2: float
    vote_margin: int
    answer_floor: float
    hit_rate: float
    fidelity: float  # share of hits whose label equals the full model's
    hits: int


@dataclass(frozen=True)
class Calibration:
    rule: HitRule
    chosen: CalibrationPoint
    curve: list[CalibrationPoint]  # every candidate tried, for the hit-rate/fidelity plot
    frames: int


Neighbours = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def _stream_neighbours(
    features: np.ndarray, labels: np.ndarray, confidences: np.ndarray, k: int
) -> Neighbours:
    """Per frame in order: distances, labels, confidences of its k nearest earlier frames."""
    out: Neighbours = []
    for i in range(len(features)):
        if i == 0:
            out.append((np.empty(0), np.empty(0, dtype=np.int64), np.empty(0)))
            continue
        d = np.linalg.norm(features[:i] - features[i], axis=1)
        order = np.argsort(d, kind="stable")[:k]
        out.append((d[order], labels[:i][order], confidences[:i][order]))
    return out


def _replay(neighbours: Neighbours, labels: np.ndarray, rule: HitRule) -> tuple[int, int]:
    hits = correct = 0
    for i, (distances, near_labels, near_confidences) in enumerate(neighbours):
        decision = decide(list(distances), list(near_labels), rule, list(near_confidences))
        if decision.hit:
            hits += 1
            correct += int(decision.label == labels[i])
    return hits, correct


# The depths whose defaults were measured (EfficientNet-Lite0's blocks.4 and the
# thumbnail, which does not depend on the model); any other depth has none.
MEASURED_DEPTHS = ("thumb16", "blocks.4")
# Answers exact repeats only: what a depth without a measured default starts from.
EXACT_ONLY = HitRule(threshold_l2=0.0, vote_margin=2)


def default_rule(depth: str) -> HitRule:
    """The rule a key depth starts from when nothing was calibrated (see the thresholds
    above); a depth nobody measured answers exact repeats only."""
    if depth.startswith("thumb"):
        return HitRule(threshold_l2=THUMBNAIL_THRESHOLD_L2)
    if depth in MEASURED_DEPTHS:
        return HitRule()
    return EXACT_ONLY


# A calibration with fewer hits than this says nothing about its threshold:
# one wrong hit in 20 already fails a 0.99 target.
MIN_CALIBRATION_HITS = 20


def calibrate_or_default(
    depth: str,
    fit: tuple[np.ndarray, np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    target_fidelity: float = DEFAULT_TARGET_FIDELITY,
) -> tuple[HitRule, str, Calibration]:
    """Calibrate one depth on ``fit`` (features, labels, confidences); keep the default rule
    when the calibration saw too few hits or failed on ``held_out``. Returns (rule, verdict,
    calibration)."""
    result = calibrate(*fit, target_fidelity=target_fidelity)
    if result.chosen.hits < MIN_CALIBRATION_HITS:
        # Measured on Fashion-MNIST's small CNN: blocks.4's default at another
        # model's depth let hits agree on 0.78 of them; unmeasured depths answer
        # exact repeats only until a calibration has hits enough to say more.
        return default_rule(depth), "too few hits: defaults kept", result
    if held_out is not None and len(held_out[0]):
        check = evaluate(*held_out, result.rule)
        if check.fidelity < target_fidelity:
            return default_rule(depth), "failed on held-out frames: defaults kept", result
    return result.rule, "calibrated", result


def default_thresholds() -> list[float]:
    """0.02 to 1.0 in steps of 0.02: an entry's reach is this times its scaled confidence."""
    return [round(0.02 * i, 3) for i in range(1, 51)]


def calibrate(
    features: np.ndarray,
    labels: np.ndarray,
    confidences: np.ndarray,
    target_fidelity: float = DEFAULT_TARGET_FIDELITY,
    k: int = DEFAULT_K,
    thresholds: Sequence[float] | None = None,
    margins: Sequence[int] = (1, 2),
    answer_floors: Sequence[float] = (0.5, 0.6, 0.7),
) -> Calibration:
    """Pick (threshold, margin, answer floor) with the most hits at the target fidelity.

    ``features`` are the frames' keys at one depth in stream order, ``labels``
    and ``confidences`` the full model's answers on them. Each frame is looked
    up among all earlier ones, as a peer would see them. For each margin and
    floor the threshold grows until the hits first fall under
    ``target_fidelity``; the last threshold before that is kept (scanning,
    rather than taking the best point anywhere, refuses a lucky threshold past
    one that already failed). Among those, the most hits win; with none, only
    exact repeats answer.
    """
    if not len(features) == len(labels) == len(confidences):
        raise ValueError("features, labels and confidences must have the same length")
    thresholds = sorted(thresholds if thresholds is not None else default_thresholds())
    curve: list[CalibrationPoint] = []
    candidates: list[CalibrationPoint] = []
    n = len(features)
    neighbours = _stream_neighbours(features, labels, confidences, k)
    for floor in answer_floors:
        for margin in margins:
            accepted: CalibrationPoint | None = None
            failed = False
            for threshold in thresholds:
                rule = HitRule(threshold, margin, k, DEFAULT_EXACT_L2, answer_floor=floor)
                hits, correct = _replay(neighbours, labels, rule)
                point = CalibrationPoint(
                    threshold_l2=threshold,
                    vote_margin=margin,
                    answer_floor=floor,
                    hit_rate=hits / max(1, n),
                    fidelity=correct / hits if hits else 1.0,
                    hits=hits,
                )
                curve.append(point)
                failed = failed or point.fidelity < target_fidelity
                if not failed and hits:
                    accepted = point
            if accepted is not None:
                candidates.append(accepted)
    if candidates:
        chosen = max(
            # Ties go to the lower floor, the larger margin, the tighter threshold.
            candidates,
            key=lambda p: (p.hits, -p.answer_floor, p.vote_margin, -p.threshold_l2),
        )
        rule = HitRule(
            chosen.threshold_l2,
            chosen.vote_margin,
            k,
            DEFAULT_EXACT_L2,
            answer_floor=chosen.answer_floor,
        )
    else:
        # Nothing reaches the target: answer exact repeats only.
        rule = HitRule(0.0, max(margins), k, DEFAULT_EXACT_L2, answer_floor=max(answer_floors))
        chosen = CalibrationPoint(0.0, max(margins), max(answer_floors), 0.0, 1.0, 0)
    return Calibration(rule=rule, chosen=chosen, curve=curve, frames=n)


def evaluate(
    features: np.ndarray, labels: np.ndarray, confidences: np.ndarray, rule: HitRule
) -> CalibrationPoint:
    """Replay frames in stream order through a fresh cache with ``rule``: hit rate, fidelity."""
    hits, correct = _replay(_stream_neighbours(features, labels, confidences, rule.k), labels, rule)
    return CalibrationPoint(
        threshold_l2=rule.threshold_l2,
        vote_margin=rule.vote_margin,
        answer_floor=rule.answer_floor,
        hit_rate=hits / max(1, len(features)),
        fidelity=correct / hits if hits else 1.0,
        hits=hits,
    )


def upper_bound(failures: int, trials: int, z: float = 1.96) -> float:
    """Wilson score upper bound of a failure rate (95% by default); 1.0 with no trials."""
    if trials <= 0:
        return 1.0
    p = failures / trials
    denominator = 1 + z * z / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + spread) / denominator)
