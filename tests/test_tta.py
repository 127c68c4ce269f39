"""Batched TTA against an independent, image-by-image computation with a network that is not flip/rotation invariant."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from torch import nn

from brainseg_monai.inference.tta import TTAPredictor, View, predict_with_tta, tta_views


class AsymmetricNet(nn.Module):
    """A fixed random 3x3[x3] conv (asymmetric kernel) plus a ramp over each spatial axis: no symmetry survives."""

    def __init__(self, spatial_dims: int, in_channels: int = 2, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(in_channels, 1, kernel_size=3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.fill_(0.1)
        self.slopes = (0.9, -1.7, 0.6)[:spatial_dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.zeros(x.shape[2:], device=x.device)
        for axis, (size, slope) in enumerate(zip(x.shape[2:], self.slopes)):
            shape = [1] * len(self.slopes)
            shape[axis] = size
            ramp = ramp + slope * torch.linspace(-1, 1, size, device=x.device).reshape(shape)
        return self.conv(x) + ramp


class CountingFn:
    """Wraps a network function and records the batch size of every call."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.fn(x)


def _flip_pairs(dims: tuple[int, ...]) -> list:
    """(forward, inverse) for every subset of the tensor dims ``dims``; a flip is its own inverse."""
    pairs = []
    for mask in range(2 ** len(dims)):
        axes = [d for i, d in enumerate(dims) if mask >> i & 1]
        flip = functools.partial(torch.flip, dims=axes) if axes else (lambda t: t)
        pairs.append((flip, flip))
    return pairs


def _d4_pairs() -> list:
    """The 8 symmetries of the square on the (2, 3) plane, written as rotations, reflections and transposes."""
    identity = lambda t: t  # noqa: E731
    rotations = [
        (functools.partial(torch.rot90, k=k, dims=(2, 3)), functools.partial(torch.rot90, k=-k, dims=(2, 3)))
        for k in (1, 2, 3)
    ]
    reflections = [
        functools.partial(torch.flip, dims=[2]),
        functools.partial(torch.flip, dims=[3]),
        lambda t: t.transpose(2, 3),
        lambda t: torch.flip(t.transpose(2, 3), dims=[2, 3]),  # anti-transpose
    ]
    return [(identity, identity), *rotations, *[(r, r) for r in reflections]]


def _hand_pairs(mode: str, spatial_dims: int) -> list:
    if mode == "none":
        return [(lambda t: t, lambda t: t)]
    if mode == "dihedral" and spatial_dims == 2:
        return _d4_pairs()
    return _flip_pairs(tuple(range(2, 2 + spatial_dims)))


def _hand_average(net: nn.Module, images: torch.Tensor, pairs: list) -> torch.Tensor:
    """Image by image, view by view: sigmoid of the view's logits, mapped back, averaged."""
    out = []
    with torch.no_grad():
        for b in range(images.shape[0]):
            image = images[b : b + 1]
            probs = [inverse(torch.sigmoid(net(forward(image)))) for forward, inverse in pairs]
            out.append(torch.stack(probs).mean(0))
    return torch.cat(out)


def _images(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "mode, spatial_dims, n_views",
    [("none", 2, 1), ("flip", 2, 4), ("dihedral", 2, 8), ("none", 3, 1), ("flip", 3, 8), ("dihedral", 3, 8)],
)
def test_views_are_distinct_and_invertible(mode, spatial_dims, n_views):
    views = tta_views(mode, spatial_dims)
    assert len(views) == n_views
    assert views[0] == View()
    shapes = [(1, 2, 6, 6), (1, 2, 6, 5)] if spatial_dims == 2 else [(1, 2, 5, 4, 3)]
    for shape in shapes:
        x = _images(shape)
        seen = []
        for view in views:
            y = view.forward(x)
            assert tuple(y.shape[2:]) == view.spatial_shape(shape[2:])
            assert torch.equal(view.inverse(y), x)
            assert not any(y.shape == s.shape and torch.equal(y, s) for s in seen)
            seen.append(y)


@pytest.mark.parametrize(
    "mode, spatial_dims", [("none", 2), ("flip", 2), ("dihedral", 2), ("flip", 3), ("dihedral", 3)]
)
def test_tta_equals_hand_average_in_one_forward_call(mode, spatial_dims):
    net = AsymmetricNet(spatial_dims).eval()
    images = _images((3, 2, 8, 8) if spatial_dims == 2 else (3, 2, 6, 6, 4))
    counting = CountingFn(net)
    prob = TTAPredictor(mode, spatial_dims)(counting, images)
    expected = _hand_average(net, images, _hand_pairs(mode, spatial_dims))
    assert prob.shape == (3, 1, *images.shape[2:])
    assert prob.dtype == torch.float32
    torch.testing.assert_close(prob, expected, rtol=0, atol=1e-6)
    assert counting.batch_sizes == [3 * len(tta_views(mode, spatial_dims))]
    if mode != "none":  # the network is not symmetric, so averaging views changes the prediction
        plain = torch.sigmoid(net(images).detach())
        assert (prob - plain).abs().max() > 1e-2


@pytest.mark.parametrize("mode, spatial_dims, max_batch", [("none", 2, None), ("dihedral", 2, None), ("dihedral", 2, 5),
                                                      ("flip", 3, None)])
def test_spread_is_the_views_standard_deviation(mode, spatial_dims, max_batch):
    """The spread equals the population standard deviation of the hand-computed views, chunked or not."""
    net = AsymmetricNet(spatial_dims).eval()
    images = _images((3, 2, 8, 8) if spatial_dims == 2 else (3, 2, 6, 6, 4))
    mean, spread = TTAPredictor(mode, spatial_dims, max_batch=max_batch).mean_and_spread(net, images)
    with torch.no_grad():
        views = torch.stack([inverse(torch.sigmoid(net(forward(images)))) for forward, inverse in
                             _hand_pairs(mode, spatial_dims)])
    torch.testing.assert_close(mean, views.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(spread, views.std(0, correction=0), rtol=0, atol=2e-3)  # sqrt near 0 magnifies rounding
    assert torch.equal(TTAPredictor(mode, spatial_dims, max_batch=max_batch)(net, images), mean)  # the mean alone
    assert spread.min() >= 0 and spread.max() <= 0.5
    if mode == "none":
        assert torch.count_nonzero(spread) == 0
    else:  # an asymmetric network disagrees with itself across views
        assert spread.max() > 0.05


@pytest.mark.parametrize("spatial_dims, max_batch", [(2, None), (2, 5), (3, None)])
def test_an_ensemble_is_averaged_over_every_view_of_every_member(spatial_dims, max_batch):
    """Members as logit channels: the mean and spread equal those of all (view, member) probabilities by hand, and
    every view goes to all members in the same forwards as one model's."""
    members = [AsymmetricNet(spatial_dims, seed=seed).eval() for seed in (0, 1, 2)]
    ensemble = CountingFn(lambda x: torch.cat([m(x) for m in members], dim=1))
    images = _images((3, 2, 8, 8) if spatial_dims == 2 else (3, 2, 6, 6, 4))
    mode = "dihedral" if spatial_dims == 2 else "flip"
    mean, spread = TTAPredictor(mode, spatial_dims, max_batch=max_batch, members=3).mean_and_spread(ensemble, images)
    with torch.no_grad():
        views = torch.stack([inverse(torch.sigmoid(m(forward(images)))) for forward, inverse in
                             _hand_pairs(mode, spatial_dims) for m in members])
    torch.testing.assert_close(mean, views.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(spread, views.std(0, correction=0), rtol=0, atol=2e-3)
    single = CountingFn(members[0])
    TTAPredictor(mode, spatial_dims, max_batch=max_batch).mean_and_spread(single, images)
    assert ensemble.batch_sizes == single.batch_sizes
    # the members disagree beyond what the views of one do
    one_spread = TTAPredictor(mode, spatial_dims).mean_and_spread(members[0], images)[1]
    assert spread.mean() > one_spread.mean()
    # each member's own mean over the views, from the same forwards
    counted = CountingFn(lambda x: torch.cat([m(x) for m in members], dim=1))
    same_mean, same_spread, own = TTAPredictor(mode, spatial_dims, max_batch=max_batch,
                                               members=3).mean_spread_and_members(counted, images)
    assert counted.batch_sizes == single.batch_sizes and own.shape == (3, 3, *images.shape[2:])
    torch.testing.assert_close(same_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(same_spread, spread, rtol=0, atol=0)
    for k in range(3):
        torch.testing.assert_close(own[:, k : k + 1], views[k::3].mean(0), rtol=0, atol=1e-6)


def test_an_ensemble_without_views_still_has_a_spread():
    members = [AsymmetricNet(2, seed=seed).eval() for seed in (0, 1)]
    images = _images((2, 2, 8, 8))
    mean, spread = TTAPredictor("none", 2, members=2).mean_and_spread(
        lambda x: torch.cat([m(x) for m in members], dim=1), images)
    with torch.no_grad():
        a, b = (torch.sigmoid(m(images)) for m in members)
    torch.testing.assert_close(mean, (a + b) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(spread, (a - b).abs() / 2, rtol=0, atol=2e-3)


def test_non_square_dihedral_groups_views_by_shape():
    net = AsymmetricNet(2).eval()
    images = _images((2, 2, 8, 6))
    counting = CountingFn(net)
    prob = TTAPredictor("dihedral", 2)(counting, images)
    torch.testing.assert_close(prob, _hand_average(net, images, _d4_pairs()), rtol=0, atol=1e-6)
    assert counting.batch_sizes == [8, 8]  # 4 views keep (8, 6), 4 become (6, 8); 2 images each


@pytest.mark.parametrize("max_batch", [1, 5, 12, 50])
def test_max_batch_chunks_the_stacked_batch(max_batch):
    net = AsymmetricNet(2).eval()
    images = _images((3, 2, 8, 8))
    counting = CountingFn(net)
    prob = TTAPredictor("flip", 2, max_batch=max_batch)(counting, images)
    torch.testing.assert_close(prob, _hand_average(net, images, _flip_pairs((2, 3))), rtol=0, atol=1e-6)
    n_pairs = 3 * 4
    assert len(counting.batch_sizes) == math.ceil(n_pairs / max_batch)
    assert sum(counting.batch_sizes) == n_pairs
    assert max(counting.batch_sizes) == min(max_batch, n_pairs)


def test_non_square_dihedral_with_max_batch():
    net = AsymmetricNet(2).eval()
    images = _images((3, 2, 8, 6))
    counting = CountingFn(net)
    prob = TTAPredictor("dihedral", 2, max_batch=5)(counting, images)
    torch.testing.assert_close(prob, _hand_average(net, images, _d4_pairs()), rtol=0, atol=1e-6)
    assert counting.batch_sizes == [5, 5, 2, 5, 5, 2]  # two shape groups of 3 images x 4 views


def test_inference_mode_metatensor_and_function_form():
    net = AsymmetricNet(3).eval()
    images = _images((2, 2, 6, 5, 4))
    expected = _hand_average(net, images, _flip_pairs((2, 3, 4)))
    with torch.inference_mode():
        prob = predict_with_tta(net, MetaTensor(images), "flip", 3)
    assert type(prob) is torch.Tensor
    torch.testing.assert_close(prob, expected, rtol=0, atol=1e-6)


class DtypeNet(nn.Module):
    """:class:`AsymmetricNet` that records the dtype its convolution ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.dtypes = AsymmetricNet(2).eval(), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net.conv(x)
        self.dtypes.append(out.dtype)
        return self.net(x)


def test_autocast_dtype_runs_the_network_in_it_on_cpu():
    """``dtype`` autocasts on the images' own device (bfloat16 on CPU); the probabilities stay float32."""
    images = _images((3, 2, 16, 16))
    plain, autocast = DtypeNet(), DtypeNet()
    expected = TTAPredictor("dihedral", 2)(plain, images)
    prob = TTAPredictor("dihedral", 2, dtype=torch.bfloat16)(autocast, images)
    assert plain.dtypes == [torch.float32] and autocast.dtypes == [torch.bfloat16]
    assert prob.dtype == torch.float32
    torch.testing.assert_close(prob, expected, rtol=0, atol=3e-2)  # bfloat16 keeps 8 bits of mantissa
    assert not torch.equal(prob, expected), "the bfloat16 forward should round differently"


def test_sliding_window_inferer_as_network_fn():
    net = AsymmetricNet(2).eval()
    inferer = SlidingWindowInferer(roi_size=(4, 4), sw_batch_size=8, overlap=0.5)
    network_fn = functools.partial(inferer, network=net)
    images = _images((2, 2, 8, 8))
    counting = CountingFn(network_fn)
    prob = TTAPredictor("dihedral", 2)(counting, images)
    torch.testing.assert_close(prob, _hand_average(network_fn, images, _d4_pairs()), rtol=0, atol=1e-6)
    assert counting.batch_sizes == [16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_float16_autocast_matches_cpu():
    net = AsymmetricNet(2).eval()
    images = _images((3, 2, 16, 16))
    expected = TTAPredictor("dihedral", 2)(net, images)
    prob = TTAPredictor("dihedral", 2, dtype=torch.float16)(net.cuda(), images.cuda())
    assert prob.dtype == torch.float32 and prob.is_cuda
    torch.testing.assert_close(prob.cpu(), expected, rtol=0, atol=2e-2)  # float16 logits


def test_unknown_mode_lists_choices():
    with pytest.raises(ValueError, match="rotate") as err:
        tta_views("rotate", 2)
    for mode in ("none", "flip", "dihedral"):
        assert mode in str(err.value)
    with pytest.raises(ValueError, match="dihedral"):
        TTAPredictor("mirror", 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 2.5}, "max_batch"),
        ({"members": 0}, "members"),
        ({"members": True}, "members"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TTAPredictor("flip", **{"spatial_dims": 2, **kwargs})


def test_bad_view_arguments():
    with pytest.raises(ValueError, match="quarter_turns"):
        View((), 4)
    with pytest.raises(ValueError, match="flip_axes"):
        View((0, 0))


def test_bad_images_or_network_output():
    predictor = TTAPredictor("flip", 2)
    with pytest.raises(ValueError, match="images"):
        predictor(AsymmetricNet(2), _images((2, 8, 8)))
    two_channels = nn.Conv2d(2, 2, kernel_size=1)
    with pytest.raises(ValueError, match="network_fn"):
        predictor(two_channels, _images((1, 2, 8, 8)))
    with pytest.raises(ValueError, match="3-channel logits .one per member."):
        TTAPredictor("flip", 2, members=3)(two_channels, _images((1, 2, 8, 8)))
