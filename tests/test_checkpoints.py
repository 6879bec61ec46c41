"""The shared checkpoint loader: every accepted layout resolves to the same weights; bad input is a clear error."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import defocus_clip  # noqa: F401
from defocus_clip.checkpoints import load_clip, resolve_checkpoint
from defocus_clip.errors import ConfigError, DataError

NAME = "DeFocus-Mamba-Tiny-8"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(1)
    model, _, _ = open_clip.create_model_and_transforms(NAME)
    model.eval()
    root = tmp_path_factory.mktemp("ckpt")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, root / "weights.safetensors")
    torch.save({"epoch": 1, "name": NAME, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / "epoch_1.pt")
    # a run directory as the trainer writes it
    run = root / "run"
    tag = run / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": NAME}))
    save_file(sd, tag / "open_clip_model.safetensors")
    (tag / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(NAME)}))
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    return model, root


def _same_outputs(a, b):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x), rtol=0, atol=0)


@pytest.mark.parametrize("rel,model_name,kind", [
    ("weights.safetensors", NAME, "file"),
    ("epoch_1.pt", NAME, "file"),
    ("run", None, "run"),
    ("run/checkpoints", NAME, "run"),
    ("run/checkpoints/step_00000002", NAME, "local-dir"),
])
def test_every_layout_loads_the_same_weights(source, rel, model_name, kind):
    model, root = source
    loaded = load_clip(root / rel, model_name)
    assert loaded.model_name == NAME
    assert loaded.kind == kind or (rel == "run/checkpoints" and loaded.kind == "local-dir")
    _same_outputs(model, loaded.model)


def test_run_directory_names_its_model(source):
    _, root = source
    assert resolve_checkpoint(root / "run").model_name == NAME
    with pytest.raises(ConfigError, match="is a run of"):
        resolve_checkpoint(root / "run", "Causal-Mamba-Tiny-8")


def test_mismatched_weights_name_the_problem(source):
    _, root = source
    with pytest.raises(DataError, match="does not fit model 'Causal-Mamba-Tiny-8'.*unexpected"):
        load_clip(root / "weights.safetensors", "Causal-Mamba-Tiny-8")


def test_bad_input_is_a_clear_error(source, tmp_path):
    _, root = source
    with pytest.raises(DataError, match="checkpoint not found"):
        load_clip(tmp_path / "nope.pt", NAME)
    with pytest.raises(ConfigError, match="pass it"):
        load_clip(root / "weights.safetensors")
    with pytest.raises(ConfigError, match="unknown model 'NoSuch-Model'"):
        load_clip(root / "weights.safetensors", "NoSuch-Model")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        load_clip(tmp_path / "junk.pt", NAME)
    with pytest.raises(DataError, match="not a checkpoint folder"):
        load_clip(tmp_path, NAME)
