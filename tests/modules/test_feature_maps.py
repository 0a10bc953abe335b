import pytest
import torch

from linearize.modules.feature_maps import FEATURE_MAPS, build_feature_map


@pytest.mark.parametrize("name,f,F", [("hedgehog", 5, 10), ("t2r", 5, 5), ("elu", 5, 8), ("taylor", 3, 13)])
def test_output_shapes_and_positivity(name, f, F):
    fm = build_feature_map(name, num_heads=4, head_dim=8, feature_dim=f)
    x = torch.randn(2, 7, 4, 8)
    y = fm(x)
    assert fm.output_dim == F and y.shape == (2, 7, 4, F) and torch.isfinite(y).all()
    if name != "taylor":  # taylor's features can be negative; its dot products approximate exp
        assert (y >= 0).all()


def test_hedgehog_identity_init():
    fm = build_feature_map("hedgehog", num_heads=3, head_dim=8, feature_dim=4)
    x = torch.randn(2, 5, 3, 8)
    want = torch.cat([torch.softmax(x[..., :4], -1), torch.softmax(-x[..., :4], -1)], -1)
    torch.testing.assert_close(fm(x), want)
    assert sum(p.numel() for p in fm.parameters()) == 3 * 8 * 4


def test_per_head_maps_on_grouped_input_equal_repeated_input():
    """GQA keys: 4 key maps over 2 kv heads read each kv head twice, without copying it."""
    fm = build_feature_map("hedgehog", num_heads=4, head_dim=8, feature_dim=6)
    with torch.no_grad():
        fm.weight.normal_()
    k = torch.randn(2, 5, 2, 8)
    torch.testing.assert_close(fm(k), fm(k.repeat_interleave(2, dim=2)))


def test_heads_have_their_own_weights():
    fm = build_feature_map("t2r", num_heads=2, head_dim=4, feature_dim=4)
    with torch.no_grad():
        fm.weight[1].mul_(-1)
        fm.bias.fill_(0.5)
    x = torch.randn(1, 3, 1, 4).expand(1, 3, 2, 4)
    y = fm(x)
    torch.testing.assert_close(y[:, :, 0], torch.relu(x[:, :, 0] + 0.5))
    torch.testing.assert_close(y[:, :, 1], torch.relu(-x[:, :, 1] + 0.5))


def test_taylor_dot_product_is_second_order_exp():
    fm = build_feature_map("taylor", num_heads=1, head_dim=4, feature_dim=4)
    a, b = torch.randn(1, 1, 1, 4, dtype=torch.float64), torch.randn(1, 1, 1, 4, dtype=torch.float64)
    s = (a * b).sum() / 2.0  # a.b / sqrt(f)
    got = (fm.double()(a) * fm.double()(b)).sum()
    torch.testing.assert_close(got, 1 + s + s * s / 2)


def test_registry_and_unknown_name():
    assert set(FEATURE_MAPS) >= {"hedgehog", "t2r", "elu", "taylor"}
    with pytest.raises(ValueError, match="unknown feature_map 'nope'.*hedgehog"):
        build_feature_map("nope", 1, 4, 4)


def test_gradients_reach_weights():
    fm = build_feature_map("hedgehog", num_heads=2, head_dim=4, feature_dim=3)
    fm(torch.randn(1, 4, 2, 4)).pow(2).sum().backward()
    assert fm.weight.grad is not None and fm.weight.grad.abs().sum() > 0
