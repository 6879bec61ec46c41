"""Official OpenGVLab checkpoint layout: key names, loader round trip, size inference, clear errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import defocus_clip
from defocus_clip import DataError, load_official_defocus_mamba

from .helpers import perturb_, tiny_mamba


def official_keys(depth: int, *, rope: bool = True, aux: bool = True, mlp: bool = False) -> set[str]:
    """Key names of `classification/models/defocus_attention_network.py` (paper-notes 1.4), written out."""
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "norm.weight", "norm.bias"}
    for i in range(depth):
        keys |= {f"blocks.{i}.norm.weight"} | {
            f"blocks.{i}.mixer.{k}" for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                                               "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight")
        }
        if rope:
            keys.add(f"blocks.{i}.mixer.freq")
    for head in ("head", "head2") if aux else ("head",):
        keys |= {f"{head}.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} if mlp else {
            f"{head}.weight", f"{head}.bias"}
    return keys


def _official_like(**kw):
    """A tiny tower with heads as the official classification model has them, weights moved off their init."""
    torch.manual_seed(0)
    return perturb_(tiny_mamba(img_size=24, patch_size=8, num_classes=7, aux_head=True, **kw)).eval()


@pytest.mark.parametrize("mlp", [False, True])
def test_state_dict_uses_the_official_key_layout(mlp):
    model = _official_like(head_type="mlp" if mlp else "linear")
    assert set(model.state_dict()) == official_keys(2, mlp=mlp)
    plain = tiny_mamba(num_classes=7, use_rope=False, group_norm_size=0)
    assert set(plain.state_dict()) == official_keys(2, rope=False, aux=False)


class FakeCfgNode(dict):
    """Like yacs' CfgNode: a dict subclass with instance attributes, pickled beside the weights."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.__dict__["immutable"] = True


def _save_training_checkpoint(sd, path):
    """What the official `save_checkpoint_ema` writes: weights plus optimizer state, epoch and the yacs config,
    saved by a process where the config class is importable but loaded where it is not."""
    mod = types.ModuleType("yacs_like_config")
    FakeCfgNode.__module__ = "yacs_like_config"
    mod.FakeCfgNode = FakeCfgNode
    sys.modules["yacs_like_config"] = mod
    try:
        torch.save({"model": sd, "model_ema": sd, "optimizer": {"state": {}}, "epoch": 299, "max_accuracy": 82.0,
                    "config": FakeCfgNode(MODEL=FakeCfgNode(NAME="defocus_mamba_base"))}, path)
    finally:
        del sys.modules["yacs_like_config"]


@pytest.mark.parametrize("wrap", ["dict", "model", "state_dict", "file", "training-file", "prefixed"])
def test_round_trip_is_exact(tmp_path, wrap):
    model = _official_like(sections=1)
    sd = model.state_dict()
    source = {
        "dict": sd, "model": {"model": sd}, "state_dict": {"state_dict": sd, "epoch": 3},
        "prefixed": {f"module.{k}": v for k, v in sd.items()},
    }.get(wrap)
    if wrap == "file":
        source = tmp_path / "ckpt.pth"
        torch.save({"model": sd}, source)
    elif wrap == "training-file":
        source = tmp_path / "ckpt_epoch_299.pth"
        _save_training_checkpoint(sd, source)
    loaded = load_official_defocus_mamba(source, img_size=24)
    assert not loaded.training
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded.forward_tokens(images), model.forward_tokens(images))
        assert torch.equal(loaded(images), model(images))
        assert torch.equal(loaded.forward_aux_head(loaded.forward_tokens(images)),
                           model.forward_aux_head(model.forward_tokens(images)))


def test_sizes_are_inferred_from_shapes():
    model = _official_like(embed_dim=48, depth=3, d_inner=192, d_state=8, dt_rank=5,
                           head_type="mlp")
    loaded = load_official_defocus_mamba(model.state_dict(), img_size=24, group_norm_size=64,
                                         delta_scale_factor=2.0, rope_scale_factor=4.0)
    mixer = loaded.blocks[0].mixer
    assert (loaded.embed_dim, len(loaded.blocks), loaded.patch_size) == (48, 3, (8, 8))
    assert (mixer.d_inner, mixer.d_state, mixer.dt_rank) == (192, 8, 5)
    assert isinstance(loaded.head, torch.nn.Sequential) and loaded.head[-1].out_features == 7
    assert loaded.head2 is not None and loaded.num_classes == 7
    assert (mixer.group_norm_size, mixer.delta_scale_factor, mixer.rope_scale_factor) == (64, 2.0, 4.0)
    torch.testing.assert_close(mixer.freq, model.blocks[0].mixer.freq, rtol=0, atol=0)


def test_patch_size_32_and_no_heads():
    model = tiny_mamba(img_size=64, patch_size=32, num_classes=0)
    loaded = load_official_defocus_mamba(model.state_dict(), img_size=64)
    assert loaded.patch_size == (32, 32) and loaded.num_classes == 0 and loaded.head2 is None


def _partial(sd):
    return {k: v for k, v in sd.items() if k != "blocks.1.mixer.D"}


def _reshaped(sd):
    return {**sd, "blocks.1.mixer.in_proj.weight": torch.zeros(5, 32)}


def _extra(sd):
    return {**sd, "blocks.0.mixer.bogus": torch.zeros(1)}


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [(_partial, "blocks.1.mixer.D"), (_reshaped, "blocks.1.mixer.in_proj.weight"), (_extra, "bogus"),
     (lambda sd: {"encoder.weight": torch.zeros(2)}, "patch_embed.proj.weight"),
     (lambda sd: {"model": [1, 2]}, "state dict")],
)
def test_wrong_or_partial_checkpoint_gives_data_error(mutate, needle):
    sd = _official_like().state_dict()
    with pytest.raises(DataError, match=needle):
        load_official_defocus_mamba(mutate(sd), img_size=24)


def test_unreadable_or_missing_file_gives_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_official_defocus_mamba(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.pth"):
        load_official_defocus_mamba(bad)


def test_loader_is_exported():
    assert defocus_clip.load_official_defocus_mamba is load_official_defocus_mamba
