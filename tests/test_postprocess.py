"""Post-processing on hand-made probability maps whose right answer is known pixel by pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.morphology import ball, disk

from brainseg_monai.inference.postprocess import PostProcessing, postprocess


def _blob_with_spur_and_line() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A disk of 81 px with a 1-px-wide, 3-px-long spur, and a separate 1 x 5 px tumour that an opening would erase."""
    blob = np.zeros((24, 24), bool)
    blob[3:14, 3:14] = disk(5).astype(bool)
    spur = np.zeros_like(blob)
    spur[8, 14:17] = True  # sticks out of the disk's right edge at (8, 13)
    line = np.zeros_like(blob)
    line[20, 5:10] = True
    return blob, spur, line


def test_threshold_is_inclusive_and_output_is_uint8_01():
    prob = np.array([[0.1, 0.49, 0.5], [0.51, 0.9, 1.0]], dtype=np.float32)
    out = postprocess(prob)
    assert out.dtype == np.uint8 and out.shape == prob.shape
    np.testing.assert_array_equal(out, [[0, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(postprocess(prob, threshold=0.6), [[0, 0, 0], [0, 1, 1]])


def test_min_size_removes_smaller_components_only():
    mask = np.zeros((10, 10), bool)
    mask[1, 1:4] = True  # 3 px
    mask[5:9, 5:9] = True  # 16 px
    prob = mask * 0.8
    np.testing.assert_array_equal(postprocess(prob, min_size=3), mask)
    for min_size in (4, 5):
        expected = mask.copy()
        expected[1, 1:4] = False
        np.testing.assert_array_equal(postprocess(prob, min_size=min_size), expected)
    assert postprocess(prob, min_size=17).sum() == 0


def test_connectivity_decides_what_a_component_is():
    prob = np.zeros((6, 6))
    prob[[1, 2, 3], [1, 2, 3]] = 0.9  # a diagonal: one component with full connectivity, three with faces only
    np.testing.assert_array_equal(postprocess(prob, min_size=3), prob > 0.5)
    np.testing.assert_array_equal(postprocess(prob, min_size=3, connectivity=2), prob > 0.5)
    assert postprocess(prob, min_size=2, connectivity=1).sum() == 0


def test_opening_only_above_open_above_trims_spur_and_spares_small_tumour():
    blob, spur, line = _blob_with_spur_and_line()
    prob = np.where(blob | spur | line, 0.9, 0.1)
    np.testing.assert_array_equal(postprocess(prob, open_above=20), blob | line)
    # opening everything (open_above=0) would erase the 5-px tumour; no opening keeps the spur
    np.testing.assert_array_equal(postprocess(prob, open_above=0), blob)
    np.testing.assert_array_equal(postprocess(prob), blob | spur | line)
    # the 84-px blob is not above 84, so it is left alone
    np.testing.assert_array_equal(postprocess(prob, open_above=84), blob | spur | line)


def test_opening_in_3d_uses_a_ball():
    volume = np.zeros((16, 16, 16), bool)
    volume[2:11, 2:11, 2:11] = ball(4).astype(bool)  # 257 voxels, unchanged by an opening with ball(1)
    spur = np.zeros_like(volume)
    spur[6, 6, 11:14] = True
    line = np.zeros_like(volume)
    line[14, 2:7, 14] = True
    prob = np.where(volume | spur | line, 0.8, 0.0)
    np.testing.assert_array_equal(postprocess(prob, open_above=20), volume | line)


def test_keep_largest():
    blob, spur, line = _blob_with_spur_and_line()
    prob = np.where(blob | spur | line, 0.9, 0.0)
    np.testing.assert_array_equal(postprocess(prob, keep_largest=True), blob | spur)
    np.testing.assert_array_equal(postprocess(np.zeros((5, 5)), keep_largest=True), np.zeros((5, 5)))
    # with min_size above the largest, nothing is left
    assert postprocess(prob, keep_largest=True, min_size=100).sum() == 0


def test_settings_round_trip_and_call():
    settings = PostProcessing(threshold=np.float32(0.25), min_size=np.int64(4), open_above=20, keep_largest=True)
    stored = json.loads(json.dumps(settings.to_dict()))
    assert stored == {
        "threshold": 0.25,
        "min_size": 4,
        "open_above": 20,
        "open_radius": 1,
        "keep_largest": True,
        "connectivity": None,
    }
    assert PostProcessing.from_dict(stored) == settings
    assert PostProcessing.from_dict({}) == PostProcessing() and PostProcessing().threshold == 0.5
    blob, spur, line = _blob_with_spur_and_line()
    prob = np.where(blob | spur | line, 0.3, 0.2)
    np.testing.assert_array_equal(settings(prob), blob)
    np.testing.assert_array_equal(settings(prob), postprocess(prob, **stored))


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="thresh") as err:
        PostProcessing.from_dict({"thresh": 0.4})
    assert "threshold" in str(err.value)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": -0.2}, "threshold"),
        ({"threshold": "0.5"}, "threshold"),
        ({"min_size": -1}, "min_size"),
        ({"min_size": 2.5}, "min_size"),
        ({"open_above": -1}, "open_above"),
        ({"open_radius": 0}, "open_radius"),
        ({"keep_largest": "yes"}, "keep_largest"),
        ({"connectivity": 0}, "connectivity"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PostProcessing(**kwargs)
    with pytest.raises(ValueError, match=name):
        postprocess(np.zeros((4, 4)), **kwargs)


def test_bad_prob_shape_or_connectivity_for_it():
    with pytest.raises(ValueError, match="prob"):
        postprocess(np.zeros(5))
    with pytest.raises(ValueError, match="prob"):
        postprocess(np.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="connectivity"):
        postprocess(np.zeros((4, 4)), connectivity=3)
    assert postprocess(np.zeros((4, 4, 4)), connectivity=3).sum() == 0
