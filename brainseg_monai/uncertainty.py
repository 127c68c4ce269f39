"""How sure the model is about a case: the disagreement of its test-time views, per voxel and per case.

The voxel map is the standard deviation of the TTA views' probabilities
(:meth:`~brainseg_monai.inference.tta.TTAPredictor.mean_and_spread`): 0 where the 8 views agree, at most 0.5. The case
score is the mean of that map over the predicted tumour and a ring of :data:`RING_PIXELS` pixels around it in each
slice, where a mask that the views do not agree on shows its doubt: a confident mask has a thin band of disagreement
at its edge, a doubtful one a wide band or disagreement inside. A case the model predicts no tumour in scores the mean
over the pixels any view would have called tumour (probability above the threshold's half), so a tumour some views
see and the average misses is not scored as certain.

A case whose score is above the model's ``review_above`` (``model.json``, ``uncertainty`` block, chosen on patients
the model never saw: bundle/docs/README.md, "How sure the model is") is flagged ``review``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

__all__ = ["RING_PIXELS", "case_score", "needs_review", "validate"]

#: width (pixels, in-plane) of the band around the predicted tumour that the case score includes
RING_PIXELS = 2


def _planes(values: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """The (x, y) planes of a volume (its last axis), or a slice folder's slices as they are (their sizes may differ)."""
    if isinstance(values, np.ndarray):
        return [values] if values.ndim == 2 else list(np.moveaxis(values, -1, 0))
    return [np.asarray(v) for v in values]


def case_score(prob: np.ndarray | Sequence[np.ndarray], spread: np.ndarray | Sequence[np.ndarray],
               mask: np.ndarray | Sequence[np.ndarray], threshold: float) -> float:
    """The case's uncertainty: the mean TTA standard deviation over its predicted tumour and ring (see the module).

    The ring is grown in each (x, y) plane alone (slices are thick); without a predicted tumour anywhere in the case,
    the region grows from where the probability passes half the threshold.

    Args:
        prob, spread, mask: one (x, y[, z]) array each, or one (x, y) array per slice of a slice folder.
        threshold: the probability threshold of the post-processing that made ``mask``.

    Returns 0.0 when no pixel is in the region: every view is sure there is no tumour.

    Raises:
        ValueError: when the three do not have one shape, plane by plane.
    """
    probs, spreads, masks = _planes(prob), _planes(spread), _planes(mask)
    shapes = [[a.shape for a in planes] for planes in (probs, spreads, masks)]
    if not shapes[0] == shapes[1] == shapes[2]:
        raise ValueError(f"prob, spread and mask must have one shape but have {shapes}.")
    from_mask = any(m.any() for m in masks)
    ring = np.ones((2 * RING_PIXELS + 1,) * 2, dtype=bool)
    total, count = 0.0, 0
    for p, s, m in zip(probs, spreads, masks):
        seed = m.astype(bool) if from_mask else p > threshold / 2
        if seed.any():
            region = ndimage.binary_dilation(seed, structure=ring)
            total += float(s[region].sum(dtype=np.float64))
            count += int(region.sum())
    return total / count if count else 0.0


def needs_review(score: float, settings: Mapping[str, Any]) -> bool | None:
    """Whether a case with ``score`` is to be reviewed by a person: above the model's ``review_above``; None when the
    model's ``uncertainty`` settings hold no threshold."""
    above = settings.get("review_above")
    return None if above is None else bool(score > float(above))


def validate(scores: Mapping[str, float], dice: Mapping[str, float], failure_below: float = 0.7,
             top_fraction: float = 0.2) -> dict[str, Any]:
    """How well case scores find the bad masks: their Spearman correlation with the cases' Dice, and how many of the
    failures (Dice below ``failure_below``) are among the ``top_fraction`` most uncertain cases.

    ``review_above`` is the score that flags that top fraction on these cases (the score of the least uncertain case
    in it, less half the gap to the next): chosen on cases a model never saw, it is the threshold to store with it.

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
