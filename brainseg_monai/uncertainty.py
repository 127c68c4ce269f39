"""How sure the model is about a case: the disagreement of its test-time views per voxel, and one score per case.

The voxel map is the standard deviation of the TTA views' probabilities
(:meth:`~brainseg_monai.inference.tta.TTAPredictor.mean_and_spread`): 0 where the 8 views agree, at most 0.5.

The case score (:data:`EXPECTED_DICE`) is one minus the mask's *expected Dice*: the Dice it would reach if the tumour were
drawn voxel by voxel from the views' mean probability, ``2 sum(p m) / (sum(p) + sum(m))``. It is low where the
probability mass sits inside the mask, and high where the mask holds doubtful voxels, where mass lies outside it (a
tumour the threshold or the post-processing dropped) or where the tumour is small beside its band of doubt. The sums
run over the mask and the voxels any view would have called tumour (probability above the threshold's half), grown by
:data:`RING_PIXELS` in each slice, so the faint probabilities of the rest of the scan do not add up. A case with no
predicted tumour scores the chance that there is one there after all, ``1 - prod(1 - p)``. On the 31 LGG patients the
shipped model never saw it ranked the masks better than the mean spread over the mask and its ring, the score before
it (Spearman rho with their Dice -0.64 against -0.50; bundle/docs/README.md, "How sure the model is").

An ensemble (`brainseg_monai.networks.ensemble`) scores its members' disagreement instead (:data:`MEMBERS_DICE`,
:func:`members_score`): one minus the mean Dice between the masks its members make each alone, post-processed as the
ensemble's. Two models trained apart disagree where either is wrong more often than one model's views do: on the 31
patients, two models of the shipped recipe scored rho -0.80 this way, their ensemble's expected Dice -0.62.

A case whose score is above the model's ``review_above`` (``model.json``, ``uncertainty`` block, chosen on patients
the model never saw, with ``score`` naming the score it was chosen for) is flagged ``review``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

__all__ = ["EXPECTED_DICE", "MEMBERS_DICE", "RING_PIXELS", "SCORES", "case_score", "members_score", "needs_review", "validate"]

#: width (pixels, in-plane) of the band around the predicted tumour and the views' doubt that the case score includes
RING_PIXELS = 2

#: the names of the case scores, stored beside ``review_above`` in ``model.json``: a threshold chosen for another score
#: (a model.json before them, whose ``review_above`` was a mean spread) is not applied
EXPECTED_DICE = "1 - expected Dice"
MEMBERS_DICE = "1 - members' Dice"
#: every case score's name: a case scored under other names is scored again on ``--resume``
SCORES = (EXPECTED_DICE, MEMBERS_DICE)


def _planes(values: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """The (x, y) planes of a volume (its last axis), or a slice folder's slices as they are (their sizes may differ)."""
    if isinstance(values, np.ndarray):
        return [values] if values.ndim == 2 else list(np.moveaxis(values, -1, 0))
    return [np.asarray(v) for v in values]


def case_score(prob: np.ndarray | Sequence[np.ndarray], mask: np.ndarray | Sequence[np.ndarray],
               threshold: float) -> float:
    """The case's uncertainty in [0, 1]: one minus the mask's expected Dice under the views' mean probability (see
    the module).

    The region is grown in each (x, y) plane alone (slices are thick).

    Args:
        prob, mask: one (x, y[, z]) array each, or one (x, y) array per slice of a slice folder; ``prob`` is the mean
            of the test-time views (and of an ensemble's members).
        threshold: the probability threshold of the post-processing that made ``mask``.

    Returns 0.0 when no voxel is in the region: every view is sure there is no tumour.

    Raises:
        ValueError: when the two do not have one shape, plane by plane.
    """
    probs, masks = _planes(prob), _planes(mask)
    if [a.shape for a in probs] != [m.shape for m in masks]:
        raise ValueError(f"prob and mask must have one shape but have {[a.shape for a in probs]} and "
                         f"{[m.shape for m in masks]}.")
    masks = [m.astype(bool) for m in masks]
    predicted = sum(int(m.sum()) for m in masks)
    ring = np.ones((2 * RING_PIXELS + 1,) * 2, dtype=bool)
    overlap = mass = log_none = 0.0
    for p, m in zip(probs, masks):
        seed = m | (p > threshold / 2)
        if not seed.any():
            continue
        region = ndimage.binary_dilation(seed, structure=ring)
        inside = np.clip(p[region].astype(np.float64), 0.0, 1.0)
        if predicted:
            overlap += float(inside[m[region]].sum())
            mass += float(inside.sum())
        else:
            log_none += float(np.log1p(-np.minimum(inside, 1.0 - 1e-12)).sum())
    if predicted:
        return 1.0 - 2.0 * overlap / (mass + predicted)
    return float(-np.expm1(log_none))  # no mask: the chance that some voxel of the region is tumour


def members_score(member_masks: Sequence[np.ndarray | Sequence[np.ndarray]]) -> float:
    """An ensemble's case uncertainty in [0, 1]: one minus the mean Dice over every pair of its members' masks, each
    pooled over the whole case (two empty masks agree: Dice 1).

    Args:
        member_masks: per member, its (x, y[, z]) mask or one (x, y) mask per slice of a slice folder.

    Raises:
        ValueError: with fewer than two members, or masks of different shapes.
    """
    members = [[np.asarray(plane, dtype=bool) for plane in _planes(masks)] for masks in member_masks]
    if len(members) < 2:
        raise ValueError(f"the members' disagreement needs two or more members' masks, not {len(members)}.")
    if any([m.shape for m in planes] != [m.shape for m in members[0]] for planes in members):
        raise ValueError("the members' masks must have one shape, plane by plane.")
    dices = []
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            both = sum(int((a & b).sum()) for a, b in zip(members[i], members[j]))
            total = sum(int(a.sum()) + int(b.sum()) for a, b in zip(members[i], members[j]))
            dices.append(2.0 * both / total if total else 1.0)
    return 1.0 - float(np.mean(dices))


def needs_review(score: float, settings: Mapping[str, Any], score_name: str = EXPECTED_DICE) -> bool | None:
    """Whether a case with ``score`` (of the score named ``score_name``) is to be reviewed by a person: above the
    model's ``review_above``; None when the model's ``uncertainty`` settings hold no threshold, or one chosen for
    another score (with a warning)."""
    above = settings.get("review_above")
    if above is None:
        return None
    if settings.get("score") != score_name:
        warnings.warn(f"the model's review_above {above} was chosen for another case score "
                      f"({settings.get('score') or 'the mean TTA spread of earlier versions'}), not {score_name!r}: no "
                      "case is flagged for review; choose it again with scripts/uncertainty_validation.py and store "
                      "it with its score name in model.json.", stacklevel=2)
        return None
    return bool(score > float(above))


def validate(scores: Mapping[str, float], dice: Mapping[str, float], failure_below: float = 0.7,
             top_fraction: float = 0.2, score_name: str = EXPECTED_DICE) -> dict[str, Any]:
    """How well case scores find the bad masks: their Spearman correlation with the cases' Dice, and how many of the
    failures (Dice below ``failure_below``) are among the ``top_fraction`` most uncertain cases.

    ``review_above`` is the score that flags that top fraction on these cases (the score of the least uncertain case
    in it, less half the gap to the next): chosen on cases a model never saw, it is the threshold to store with it,
    beside ``score``, the name of the score it was chosen for (``score_name``).

    Args:
        scores, dice: by case id; only the cases in both are used.

    Raises:
        ValueError: with fewer than 3 cases in common, or ``top_fraction`` outside (0, 1).
    """
    if not 0.0 < top_fraction < 1.0:
        raise ValueError(f"top_fraction must be in (0, 1) but is {top_fraction!r}.")
    cases = sorted(set(scores) & set(dice))
    if len(cases) < 3:
        raise ValueError(f"validating needs at least 3 cases with both a score and a Dice, not {len(cases)}.")
    score = np.array([scores[c] for c in cases], dtype=np.float64)
    quality = np.array([dice[c] for c in cases], dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    top = order[: int(np.ceil(top_fraction * len(cases)))]
    failures = quality < failure_below
    rest = np.setdiff1d(order, top)
    lowest_flagged = score[top].min()
    review_above = (lowest_flagged + score[rest].max()) / 2 if rest.size else lowest_flagged
    return {
        "score": score_name,
        "cases": len(cases),
        "spearman_rho": float(stats.spearmanr(score, quality).statistic),
        "failure_below": failure_below,
        "failures": int(failures.sum()),
        "top_fraction": top_fraction,
        "top_cases": int(top.size),
        "failures_in_top": int(failures[top].sum()),
        "review_above": float(review_above),
        "per_case": [{"case": c, "uncertainty": scores[c], "dice": dice[c]} for c in cases],
    }
