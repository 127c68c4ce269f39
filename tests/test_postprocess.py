"""Post-processing on hand-made probability maps whose right answer is known pixel by pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.morphology import ball, disk

from brainseg_monai.inference.postprocess import PostProcessing, postprocess, slice_stacks


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


def test_keep_fraction_weighs_components_by_their_probability_mass():
    """A small tumour the model is sure of against a larger, fainter false positive: keep_largest keeps the false
    positive; keep_fraction keeps what holds enough of the heaviest component's probability mass."""
    tumour = np.zeros((3, 30, 30), bool)
    tumour[1, 3:8, 3:8] = True  # 25 voxels at 0.95: mass 23.75
    false_positive = np.zeros_like(tumour)
    false_positive[:, 15:25, 15:25] = True  # 300 voxels at 0.2: mass 60
    faint = np.zeros_like(tumour)
    faint[2, 27:29, 2:4] = True  # 4 voxels at 0.3: mass 1.2
    prob = np.where(tumour, 0.95, np.where(false_positive, 0.2, np.where(faint, 0.3, 0.0)))
    np.testing.assert_array_equal(postprocess(prob, threshold=0.15, keep_largest=True), false_positive)
    np.testing.assert_array_equal(postprocess(prob, threshold=0.15, keep_fraction=0.3), tumour | false_positive)
    np.testing.assert_array_equal(postprocess(prob, threshold=0.15, keep_fraction=0.01), tumour | false_positive | faint)
    np.testing.assert_array_equal(postprocess(prob, threshold=0.15, keep_fraction=1.0), false_positive)
    # the mass is counted after min_size removed components: the heaviest left sets the scale
    np.testing.assert_array_equal(postprocess(prob, threshold=0.15, keep_fraction=0.5, min_size=301), np.zeros_like(tumour))
    np.testing.assert_array_equal(postprocess(np.zeros((5, 5)), keep_fraction=0.5), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="set one"):
        PostProcessing(keep_largest=True, keep_fraction=0.2)
    assert PostProcessing(keep_fraction=0.1, stack_slices=True).describe() == (
        "components under 0.1 of the heaviest's probability mass removed (a patient's numbered slices as one stack)")


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
        "stack_slices": False,
        "keep_fraction": None,
    }
    assert PostProcessing.from_dict(stored) == settings
    assert PostProcessing.from_dict({}) == PostProcessing() and PostProcessing().threshold == 0.5
    blob, spur, line = _blob_with_spur_and_line()
    prob = np.where(blob | spur | line, 0.3, 0.2)
    np.testing.assert_array_equal(settings(prob), blob)
    stored.pop("stack_slices")  # a setting of a case's slices; postprocess() takes one map
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
        ({"keep_fraction": 0.0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"keep_fraction": True}, "keep_fraction"),
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


def _stack_with_far_blob() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Six 20 x 20 slices: a tumour of 3 x 36 = 108 voxels on slices 1-3 (one 3D component) and a 25-pixel blob alone
    on slice 5, as a false positive far from the tumour would be."""
    tumour = np.zeros((6, 20, 20), bool)
    tumour[1:4, 5:11, 5:11] = True
    far = np.zeros_like(tumour)
    far[5, 2:7, 12:17] = True
    probs = [np.where(t | f, 0.9, 0.1) for t, f in zip(tumour, far)]
    return probs, tumour, far


PATIENT = [f"/data/TCGA_XX_0001/TCGA_XX_0001_{n}.tif" for n in range(1, 7)]


def test_stack_slices_makes_components_3d():
    probs, tumour, far = _stack_with_far_blob()
    # slice by slice, the far blob is the largest (only) component of its slice and stays
    per_slice = PostProcessing(keep_largest=True).apply_to_slices(probs, PATIENT)
    np.testing.assert_array_equal(np.stack(per_slice), tumour | far)
    stacked = PostProcessing(keep_largest=True, stack_slices=True).apply_to_slices(probs, PATIENT)
    assert all(m.dtype == np.uint8 and m.shape == (20, 20) for m in stacked)
    np.testing.assert_array_equal(np.stack(stacked), tumour)
    # sizes count voxels of the stack: 36 px per slice is below 50, the tumour's 108 voxels are not
    assert np.stack(PostProcessing(min_size=50).apply_to_slices(probs, PATIENT)).sum() == 0
    np.testing.assert_array_equal(
        np.stack(PostProcessing(min_size=50, stack_slices=True).apply_to_slices(probs, PATIENT)), tumour)
    # slices given in another order are stacked by their numbers and returned in the order given
    order = [5, 2, 0, 4, 1, 3]
    shuffled = PostProcessing(keep_largest=True, stack_slices=True).apply_to_slices(
        [probs[i] for i in order], [PATIENT[i] for i in order])
    np.testing.assert_array_equal(np.stack(shuffled), tumour[order])
    # one slice alone is post-processed as itself
    np.testing.assert_array_equal(
        PostProcessing(keep_largest=True, stack_slices=True).apply_to_slices(probs[5:], PATIENT[5:]), [far[5]])


def test_slice_stacks_group_one_patients_numbered_slices_in_number_order():
    paths = ["/a/P1_10.tif", "/a/P1_9.tif", "/a/P2_1.png", "/a/P1_1.tif", "/b/P1_2.tif", "/b/P1_3.tif", "/a/12.png",
             "/a/13.png", "/a/P2_mask.png", "/a/lone_4.tif"]
    assert sorted(slice_stacks(paths)) == [[3, 1, 0], [4, 5]]
    assert slice_stacks([]) == []


def test_unrelated_images_and_slices_of_different_sizes_are_post_processed_one_by_one(
    caplog: pytest.LogCaptureFixture,
):
    probs, tumour, far = _stack_with_far_blob()
    unnumbered = [f"/upload/{n}.png" for n in range(6)]  # a folder of images of several patients
    masks = PostProcessing(keep_largest=True, stack_slices=True).apply_to_slices(probs, unnumbered)
    np.testing.assert_array_equal(np.stack(masks), tumour | far)
    mixed = [*probs, np.full((8, 8), 0.9)]
    with caplog.at_level("WARNING"):
        masks = PostProcessing(keep_largest=True, stack_slices=True).apply_to_slices(
            mixed, [*PATIENT, "/data/TCGA_XX_0001/TCGA_XX_0001_7.tif"])
    assert "slices of different sizes" in caplog.text and "TCGA_XX_0001" in caplog.text
    np.testing.assert_array_equal(np.stack(masks[:6]), tumour | far)
    assert masks[6].all()


def test_apply_to_slices_argument_errors():
    with pytest.raises(ValueError, match="2 probability maps but 1 paths"):
        PostProcessing().apply_to_slices([np.zeros((4, 4))] * 2, ["a_1.png"])
    with pytest.raises(ValueError, match="a_1.nii: apply_to_slices takes 2D maps"):
        PostProcessing().apply_to_slices([np.zeros((4, 4, 4))], ["a_1.nii"])


def test_stack_slices_must_be_a_bool():
    with pytest.raises(ValueError, match="stack_slices"):
        PostProcessing(stack_slices="yes")
    assert PostProcessing.from_dict({"stack_slices": np.bool_(True)}).to_dict()["stack_slices"] is True


def test_describe_names_each_step_and_the_stacking():
    assert PostProcessing().describe() == "none"
    assert PostProcessing(threshold=0.1, stack_slices=True).describe() == "none"  # stacking alone changes nothing
    assert PostProcessing(keep_largest=True, stack_slices=True).describe() == (
        "largest component kept (a patient's numbered slices as one stack)")
    assert PostProcessing(min_size=64, open_above=500, open_radius=2, keep_largest=True).describe() == (
        "components over 500 voxels opened (radius 2); components under 64 voxels removed; largest component kept")
