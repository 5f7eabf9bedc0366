"""DINO projection head and the multi-crop wrapper."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinocxr_fast.models import DINOHead, MultiCropWrapper, WeightNormLinear, create_model


def test_default_head_is_dinos():
    with torch.device("meta"):
        head = DINOHead(512)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.last_layer.weight_v.shape == (65536, 256) and head.last_layer.weight_g.shape == (65536, 1)
    # DINO's checkpoint names load as they are.
    assert {"mlp.0.weight", "mlp.2.bias", "mlp.4.weight", "last_layer.weight_g", "last_layer.weight_v"} <= set(
        head.state_dict())


def test_forward_is_mlp_then_l2_norm_then_weight_normalised_linear():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(5, 32)
    z = F.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)  # g = 1
    torch.testing.assert_close(head(x), z @ w.T)
    assert head(x).shape == (5, 100)


def test_norm_last_layer_freezes_the_norm():
    assert not DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4).last_layer.weight_g.requires_grad
    free = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
    free(torch.randn(3, 8)).sum().backward()
    assert free.last_layer.weight_g.grad is not None


def test_weight_norm_matches_torch_parametrization():
    torch.manual_seed(0)
    ours = WeightNormLinear(6, 4)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(6, 4, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(ours.weight_g)
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), ref(x))


def test_trunc_normal_init_and_options():
    torch.manual_seed(0)
    head = DINOHead(256, out_dim=64, hidden_dim=512, bottleneck_dim=64)
    w = head.mlp[0].weight
    assert w.abs().max() <= 2.0 and abs(w.std().item() - 0.02) < 0.002  # truncated at +-2 (absolute)
    assert all(m.bias.abs().sum() == 0 for m in head.mlp if isinstance(m, nn.Linear))
    with_bn = DINOHead(16, out_dim=8, hidden_dim=32, bottleneck_dim=4, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.mlp) == 2
    one = DINOHead(16, out_dim=8, bottleneck_dim=4, nlayers=1)
    assert isinstance(one.mlp, nn.Linear) and one(torch.randn(2, 16)).shape == (2, 8)


class _CountingBackbone(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.batch_shapes = []

    def forward(self, x):
        self.batch_shapes.append(tuple(x.shape))
        return self.model(x)


def test_multicrop_runs_each_resolution_once_and_keeps_crop_order():
    torch.manual_seed(0)
    backbone = create_model("vitaev2_tiny", num_classes=7).eval()
    assert isinstance(backbone.head, nn.Linear)
    counting = _CountingBackbone(backbone)
    head = DINOHead(backbone.num_features, out_dim=32, hidden_dim=64, bottleneck_dim=16)
    wrapper = MultiCropWrapper(backbone, head).eval()
    wrapper.backbone = counting
    assert isinstance(backbone.head, nn.Identity)  # the wrapper wants features

    big = [torch.randn(2, 1, 64, 64) for _ in range(2)]
    small = [torch.randn(2, 1, 32, 32) for _ in range(3)]
    crops = [big[0], small[0], big[1], small[1], small[2]]  # interleaved on purpose
    with torch.no_grad():
        out = wrapper(crops)
        one_by_one = torch.cat([head(backbone(c)) for c in crops])
    assert sorted(counting.batch_shapes) == [(4, 1, 64, 64), (6, 1, 32, 32)]
    assert out.shape == (10, 32)
    torch.testing.assert_close(out, one_by_one, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="crops"):
        wrapper([])
