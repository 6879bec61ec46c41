"""OpenCLIP integration: every CLIP config resolves to a registered tower; the image embedding is the projected
LAST token."""

from __future__ import annotations

import open_clip
import pytest
import torch

import defocus_clip


@pytest.mark.parametrize("name", defocus_clip.list_clip_models())
def test_config_resolves_to_a_registered_tower(name):
    cfg = open_clip.get_model_config(name)
    assert cfg is not None, f"{name} is not registered with OpenCLIP"
    tower = cfg["vision_cfg"]["timm_model_name"]
    assert tower in defocus_clip.list_towers()
    assert defocus_clip.clip.tower_name_of(name) == tower


@pytest.mark.parametrize("name", [n for n in defocus_clip.list_clip_models() if "Tiny" in n])
def test_tiny_model_builds_and_embeds_the_last_token(name):
    torch.manual_seed(0)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(name)
    model.eval()
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        emb = model.encode_image(images)
        trunk, head = model.visual.trunk, model.visual.head
        expected = head(trunk.forward_tokens(images)[:, -1])
        torch.testing.assert_close(emb, expected)
        text = open_clip.get_tokenizer(name)(["a photo of a cat", "a dog"])
        assert model.encode_text(text).shape == emb.shape
    assert preprocess_val is not None and preprocess_train is not None


@pytest.mark.parametrize("name", [n for n in defocus_clip.list_clip_models() if "Tiny" not in n])
def test_big_models_construct_on_the_meta_device(name):
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    assert model.visual.trunk.global_pool == "token"
    assert sum(p.numel() for p in model.visual.parameters()) > 20e6
