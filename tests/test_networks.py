"""Network registry and the attention residual SE U-Net: shapes in 2D and 3D, parts, gradients, learning, errors."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceLoss
from monai.networks.blocks import ChannelSELayer, ResidualUnit
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn

import brainseg_monai.networks as networks
from brainseg_monai.networks import NETWORKS, AttentionResSEUNet, get_network

HAS_EINOPS = networks.optional_import("einops")[1]
# 2D 64x64 and 3D 32^3 satisfy every network's divisibility (SwinUNETR needs multiples of 32)
SHAPES = {2: (2, 3, 64, 64), 3: (2, 3, 32, 32, 32)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_network_builds_and_keeps_the_spatial_size(name: str, spatial_dims: int) -> None:
    if name == "swinunetr" and not HAS_EINOPS:
        pytest.skip("swinunetr needs the einops package, which is not installed")
    torch.manual_seed(0)
    net = get_network(name, spatial_dims=spatial_dims).eval()
    shape = SHAPES[spatial_dims]
    if name == "swinunetr" and spatial_dims == 3:
        shape = (1, 3, 64, 64, 64)  # at 32^3 its deepest stage is 1 voxel, which instance norm refuses
    with torch.no_grad():
        out = net(torch.randn(shape))
    assert out.shape == (shape[0], 1, *shape[2:])
    assert torch.isfinite(out).all()


def test_registry_has_the_documented_names() -> None:
    assert set(NETWORKS) == {
        "unet", "basicunet", "attentionunet", "segresnet", "swinunetr", "flexibleunet", "attresseunet"
    }


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="name") as info:
        get_network("vnet9000")
    for name in NETWORKS:
        assert name in str(info.value)
    assert "vnet9000" in str(info.value)


def test_name_is_case_insensitive() -> None:
    assert isinstance(get_network("AttResSEUNet"), AttentionResSEUNet)


def test_bad_spatial_dims_is_refused() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        get_network("unet", spatial_dims=4)


def test_kwargs_override_defaults_and_strides_follow_channels() -> None:
    net = get_network("unet", in_channels=1, out_channels=2, channels=(8, 16, 32))
    assert net.channels == (8, 16, 32) and net.strides == (2, 2)
    assert net(torch.randn(1, 1, 20, 20)).shape == (1, 2, 20, 20)
    default = get_network("unet")
    assert default.channels == (16, 32, 64, 128, 256) and default.num_res_units == 2


def test_flexibleunet_never_downloads_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import monai.networks.nets.efficientnet as efficientnet

    def refuse(*args, **kwargs):
        raise AssertionError("FlexibleUNet tried to download pretrained weights")

    monkeypatch.setattr(efficientnet.model_zoo, "load_url", refuse)
    for spatial_dims in (2, 3):
        assert isinstance(get_network("flexibleunet", spatial_dims=spatial_dims), nn.Module)


def test_swinunetr_without_einops_fails_at_build_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networks, "optional_import", lambda module: (None, False))
    with pytest.raises(ImportError, match="einops"):
        get_network("swinunetr")


def test_bundle_config_forms_build_the_network() -> None:
    config = {
        # "$import brainseg_monai" binds the name; the second import loads the subpackage into it
        "imports": ["$import brainseg_monai", "$import brainseg_monai.networks"],
        "network_name": "attresseunet",
        "spatial_dims": 2,
        "expression": "$brainseg_monai.networks.get_network(@network_name, @spatial_dims, 1, 1, channels=[8, 16])",
        "target": {
            "_target_": "brainseg_monai.networks.get_network",
            "name": "@network_name",
            "spatial_dims": "@spatial_dims",
            "channels": [8, 16],
            "dropout": 0.0,
        },
    }
    parser = ConfigParser(config)
    from_expression = parser.get_parsed_content("expression")
    from_target = parser.get_parsed_content("target")
    assert isinstance(from_expression, AttentionResSEUNet) and from_expression.encoder[0].in_channels == 1
    assert isinstance(from_target, AttentionResSEUNet) and from_target.encoder[0].in_channels == 3


@pytest.mark.parametrize("spatial_dims, dropout_type", [(2, nn.Dropout2d), (3, nn.Dropout3d)])
def test_attresseunet_has_residual_se_attention_and_spatial_dropout(spatial_dims: int, dropout_type: type) -> None:
    net = AttentionResSEUNet(spatial_dims, 3, 1, channels=(8, 16, 32, 64), dropout=0.2)
    modules = list(net.modules())
    assert sum(isinstance(m, ChannelSELayer) for m in modules) == 1
    assert sum(isinstance(m, AttentionBlock) for m in modules) == 3  # one per skip connection
    assert sum(isinstance(m, ResidualUnit) for m in modules) == 4 + 3  # encoder levels + decoder levels
    dropout_types = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
    dropouts = [m for m in modules if isinstance(m, dropout_types)]
    assert dropouts and all(type(m) is dropout_type and m.p == 0.2 for m in dropouts)
    no_dropout = AttentionResSEUNet(spatial_dims, 3, 1, channels=(8, 16), dropout=0.0)
    assert not any(isinstance(m, dropout_types) for m in no_dropout.modules())


def test_attresseunet_backpropagates_to_every_parameter() -> None:
    torch.manual_seed(0)
    net = AttentionResSEUNet(3, 2, 1, channels=(4, 8, 16), se_reduction=4)
    out = net(torch.randn(2, 2, 16, 16, 16))
    assert out.shape == (2, 1, 16, 16, 16)
    out.square().mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in net.bridge_se.parameters())


def test_attresseunet_learns_to_segment_blobs() -> None:
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blobs = [(10, 12, 5), (20, 18, 6), (14, 22, 4), (22, 9, 5)]  # centre row, centre column, radius
    masks = torch.stack([((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float() for cy, cx, r in blobs])[:, None]
    images = masks + 0.3 * torch.randn_like(masks)
    net = AttentionResSEUNet(2, 1, 1, channels=(8, 16, 32))
    loss_fn = DiceLoss(sigmoid=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.no_grad():
        initial = loss_fn(net.eval()(images), masks).item()
    net.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss_fn(net(images), masks).backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_fn(net.eval()(images), masks).item()
    assert initial > 0.5
    assert final < 0.2


def test_attresseunet_refuses_indivisible_input_with_the_divisor() -> None:
    net = AttentionResSEUNet(2, 3, 1)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 3, 64, 60))
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(1, 3, 32, 32, 32))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 0}, "out_channels"),
        ({"channels": (16,)}, "channels"),
        ({"channels": (16, 0)}, "channels"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"se_reduction": 0}, "se_reduction"),
        ({"channels": (4, 8), "se_reduction": 16}, "se_reduction"),
    ],
)
def test_attresseunet_checks_its_arguments(kwargs: dict, argument: str) -> None:
    args = {"spatial_dims": 2, "in_channels": 3, "out_channels": 1, **kwargs}
    with pytest.raises(ValueError, match=argument):
        AttentionResSEUNet(**args)
