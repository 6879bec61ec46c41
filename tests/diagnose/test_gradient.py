"""Gradient maps: shape on the patch grid, dense where every token matters, raster placement of section scans."""

from __future__ import annotations

import pytest
import torch

from defocus_clip.diagnose import diagnose_tower, gradient_map, image_grid, layer_inputs, summarize_layer
from defocus_clip.diagnose.hooks import check_layers, classifier_loss, default_layers, find_tower
from defocus_clip.errors import ConfigError


@pytest.mark.parametrize("causal", [True, False])
def test_classifier_gradient_map_shape_and_dense(tiny_tower, causal):
    tower = tiny_tower(causal=causal, aux_head=True)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    x = layer_inputs(tower, images, [0])[0]
    g = gradient_map(classifier_loss(tower, 0, torch.tensor([1, 3])), x)
    assert g.shape == (2, 17)
    grid = image_grid(g, tower)
    assert grid.shape == (2, *tower.grid_size) == (2, 4, 4)
    assert (grid > 0).all()  # the class token reads every token through attention, so every token has gradient


def test_gradient_map_is_raster_ordered_under_section_scan(tiny_tower):
    """A loss on ONE sequence position must light up that token's raster cell of the grid, and only it."""
    tower = tiny_tower(sections=2)
    assert tower.token_perm is not None
    x = layer_inputs(tower, torch.randn(1, 3, 16, 16, dtype=torch.float64), [0])[0]
    for seq_pos in (0, 5, 13):
        g = gradient_map(lambda t, p=seq_pos: t[:, p].pow(2).sum(), x)  # noqa: B023
        grid = image_grid(g, tower)[0]
        raster = int(tower.token_perm[seq_pos])  # sequence position -> raster index of its patch
        expected = torch.zeros(16, dtype=torch.bool)
        expected[raster] = True
        assert torch.equal(grid.flatten() > 0, expected)


def test_diagnose_tower_and_summaries(tiny_tower):
    tower = tiny_tower()
    tower.train()
    maps = diagnose_tower(tower, torch.randn(2, 3, 16, 16, dtype=torch.float64), [1, 0],
                          lambda layer: classifier_loss(tower, layer), chunk_size=9)
    assert tower.training  # mode restored
    assert [m.layer for m in maps] == [0, 1]
    disp = maps[0].display(tower)
    assert disp["attention_matrix"].shape == (2, 16, 16)
    assert disp["gradient"].shape == disp["receptive_field"].shape == disp["attention_received"].shape == (2, 4, 4)
    for v in disp.values():
        assert v.amax(dim=(-2, -1)).allclose(torch.ones(2, dtype=v.dtype))  # max-normalised per map
    rows = summarize_layer(maps[1], tower)
    assert len(rows) == 2
    assert 0 < rows[0]["attention_entropy"] <= torch.log(torch.tensor(16.0)).item()
    assert 0 < rows[0]["gradient_top5_share"] <= 1
    assert 0 < rows[0]["gradient_first_half_share"] < 1


def test_layers_and_tower_lookup(tiny_tower):
    tower = tiny_tower()
    assert default_layers(24) == [6, 12, 18, 22]
    assert default_layers(12) == [3, 6, 9, 11]
    assert check_layers(tower, [-1, 0]) == [0, 1]
    with pytest.raises(ConfigError, match="valid: 0..1"):
        check_layers(tower, [2])
    assert find_tower(tower) is tower
    with pytest.raises(ConfigError, match="no token tower"):
        find_tower(torch.nn.Linear(2, 2))
