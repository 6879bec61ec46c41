"""`defocus-clip export`: every format reproduces the source model (tiny DeFocus-Mamba-Tiny-8, random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import defocus_clip
from defocus_clip.cli import main
from defocus_clip.errors import DefocusError
from defocus_clip.export import export_checkpoint, register_with_transformers

MODEL = "DeFocus-Mamba-Tiny-8"
TOWER = "defocus_mamba_tiny_patch8_64"


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The source model (fp32, eval), its weights file, reference outputs and the exports of every format."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    model.eval()
    weights = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    x = _images()
    with torch.no_grad():
        ref = dict(tokens=model.visual.trunk.forward_tokens(x), embeds=model.encode_image(x))
    # a training run directory (run.json + checkpoints/latest) with the same weights, for the timm export
    run = root / "run"
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": MODEL}))
    (run / "checkpoints" / "latest").write_text("step_00000001\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tag / "open_clip_model.safetensors"))
    out = {fmt: root / fmt for fmt in ("hf", "open_clip", "timm")}
    assert main(["export", str(weights), "--format", "hf", "--out", str(out["hf"]), "--model", MODEL,
                 "--with-projection"]) == 0
    assert main(["export", str(weights), "--format", "open_clip", "--out", str(out["open_clip"]),
                 "--model", MODEL]) == 0
    assert main(["export", str(run), "--format", "timm", "--out", str(out["timm"])]) == 0  # model name from the run
    return dict(model=model, preprocess=preprocess, weights=weights, x=x, ref=ref, root=root, **out)


def test_hf_folder_layout(src):
    names = {p.name for p in src["hf"].iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_defocus.py",
            "modeling_defocus.py", "defocus_bundle.py", "defocus_towers_mamba.py"} <= names
    cfg = json.loads((src["hf"] / "config.json").read_text())
    assert cfg["model_type"] == "defocus_vision" and cfg["tower_name"] == TOWER
    assert cfg["auto_map"]["AutoModel"] == "modeling_defocus.DefocusVisionModel"
    assert cfg["hidden_size"] == 128 and cfg["num_hidden_layers"] == 6 and cfg["projection_dim"] == 128
    pre = json.loads((src["hf"] / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor" and pre["resample"] == 3  # bicubic
    assert pre["size"] == {"shortest_edge": 64} and pre["crop_size"] == {"height": 64, "width": 64}
    assert pre["image_mean"] == pytest.approx(src["model"].visual.preprocess_cfg["mean"])


def test_hf_automodel_reproduces_source(src):
    from transformers import AutoModel

    register_with_transformers()  # `import defocus_clip` does this once the package __init__ calls it
    hf = AutoModel.from_pretrained(src["hf"]).eval()
    assert type(hf).__module__ == "defocus_clip.export.modeling_defocus"
    model, x, ref = src["model"], src["x"], src["ref"]
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        embedded = model.visual.trunk.embed_tokens(x)
    torch.testing.assert_close(out.last_hidden_state, ref["tokens"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref["embeds"], rtol=0, atol=1e-5)  # == encode_image
    torch.testing.assert_close(out.image_embeds, ref["embeds"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.class_token, ref["tokens"][:, -1], rtol=0, atol=1e-5)  # class token LAST
    assert out.last_hidden_state.shape == (2, 8 * 8 + 1, 128)
    assert len(out.hidden_states) == 6 + 1  # embeddings + every block
    torch.testing.assert_close(out.hidden_states[0], embedded, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.visual.trunk.norm(out.hidden_states[-1]), out.last_hidden_state, rtol=0, atol=1e-5)
    with torch.no_grad():
        as_tuple = hf(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    assert hf(x).hidden_states is None


def test_hf_without_projection_and_unprojected_pooler(src):
    from defocus_clip.export.hf import build_hf_model

    model, x, ref = src["model"], src["x"], src["ref"]
    bare = build_hf_model(model, MODEL, with_projection=False)
    assert bare.config.projection_dim is None and bare.visual_projection is None
    projected = build_hf_model(model, MODEL, with_projection=True)
    projected.config.project_pooler = False
    with torch.no_grad():
        for hf in (bare, projected):
            torch.testing.assert_close(hf(x).pooler_output, ref["tokens"][:, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(projected(x).image_embeds, ref["embeds"], rtol=0, atol=1e-5)


def test_hf_image_processor_matches_openclip_eval_transform(src):
    from transformers import AutoImageProcessor

    register_with_transformers()
    processor = AutoImageProcessor.from_pretrained(src["hf"])
    rng = np.random.default_rng(0)
    for hw in ((64, 64), (80, 96)):  # already the model size, and resized + center-cropped
        img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        ours = processor(images=img, return_tensors="pt")["pixel_values"]
        theirs = src["preprocess"](img)[None]
        assert ours.shape == theirs.shape == (1, 3, 64, 64)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 if hw == (64, 64) else 0.05)


def test_hf_remote_code_loads_without_defocus_clip(src):
    """trust_remote_code=True in a fresh interpreter where `import defocus_clip` fails."""
    script = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "defocus_clip" or name.startswith("defocus_clip."):
                    raise ImportError("defocus_clip is blocked in this test")

        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if not p.rstrip("/").endswith("/src")]
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert "defocus_clip" not in sys.modules
        x = torch.load(sys.argv[2])
        with torch.no_grad():
            out = model(x, output_hidden_states=True)
        torch.save({"module": type(model).__module__, "tokens": out.last_hidden_state, "pooled": out.pooler_output,
                    "n_hidden": len(out.hidden_states)}, sys.argv[3])
        """
    )
    x_path, out_path = src["root"] / "x.pt", src["root"] / "remote_out.pt"
    torch.save(src["x"], x_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(src["root"] / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", script, str(src["hf"]), str(x_path), str(out_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out_path)
    assert got["module"].startswith("transformers_modules.")  # the folder's own code, not the package
    assert got["n_hidden"] == 7
    # the bundled copy may pick another scan implementation (pure PyTorch): tolerance, not equality
    torch.testing.assert_close(got["tokens"], src["ref"]["tokens"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["pooled"], src["ref"]["embeds"], rtol=0, atol=1e-4)


def test_open_clip_local_dir_reloads(src):
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{src['open_clip']}")
    model.eval()
    own = src["model"].state_dict()
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(src["x"]), src["ref"]["embeds"], rtol=0, atol=1e-6)
    cfg = json.loads((src["open_clip"] / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == TOWER and cfg["preprocess_cfg"]["size"] == [64, 64]
    assert "import defocus_clip" in (src["open_clip"] / "README.md").read_text()


def test_timm_reloads_trunk(src):
    file = src["timm"] / "model.safetensors"
    assert not any(k.startswith(("visual.", "trunk.")) for k in load_file(str(file)))
    by_name = timm.create_model(TOWER, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(file)))
    by_dir = timm.create_model(f"local-dir:{src['timm']}", pretrained=True)
    for tower in (by_name.eval(), by_dir.eval()):
        with torch.no_grad():
            torch.testing.assert_close(tower.forward_tokens(src["x"]), src["ref"]["tokens"], rtol=0, atol=1e-6)


def test_bf16_export(src):
    from transformers import AutoModel

    register_with_transformers()
    out = export_checkpoint(src["weights"], "hf", src["root"] / "hf_bf16", model_name=MODEL, dtype="bf16")
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    hf = AutoModel.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert hf.tower.patch_embed.proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = hf(src["x"]).pooler_output.float()
    ref = src["ref"]["embeds"]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.05, f"bf16 export differs from fp32 by {rel:.3g} (relative)"
    oc = export_checkpoint(src["weights"], "open_clip", src["root"] / "oc_bf16", model_name=MODEL, dtype="bf16")
    assert {v.dtype for v in load_file(str(oc / "open_clip_model.safetensors")).values()} == {torch.bfloat16}


def test_mismatched_checkpoint_is_a_clear_error(src, capsys):
    torch.manual_seed(1)
    causal = open_clip.create_model("Causal-Mamba-Tiny-8")
    wrong = src["root"] / "causal.safetensors"
    save_file({k: v.contiguous() for k, v in causal.state_dict().items()}, str(wrong))
    with pytest.raises(DefocusError, match=r"does not fit model 'DeFocus-Mamba-Tiny-8'.*missing .*freq"):
        export_checkpoint(wrong, "hf", src["root"] / "bad", model_name=MODEL)
    rc = main(["export", str(wrong), "--format", "timm", "--out", str(src["root"] / "bad2"), "--model", MODEL])
    assert rc == 2 and "does not fit model 'DeFocus-Mamba-Tiny-8'" in capsys.readouterr().err


def test_bad_input_errors(src, capsys):
    missing = src["root"] / "nope.safetensors"
    with pytest.raises(DefocusError, match="not found.*nope.safetensors"):
        export_checkpoint(missing, "hf", src["root"] / "bad3", model_name=MODEL)
    assert main(["export", str(missing), "--format", "hf", "--out", str(src["root"] / "bad4"), "--model", MODEL]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    with pytest.raises(DefocusError, match="not empty"):  # never overwrite an export silently
        export_checkpoint(src["weights"], "hf", src["hf"], model_name=MODEL)
    with pytest.raises(DefocusError, match="format"):
        export_checkpoint(src["weights"], "onnx", src["root"] / "bad5", model_name=MODEL)
    with pytest.raises(DefocusError, match="--model"):  # a bare file does not record its model
        export_checkpoint(src["weights"], "timm", src["root"] / "bad6")


def test_bundle_rewrites_package_imports(tmp_path):
    from defocus_clip.export.bundle import _rewrite

    source = textwrap.dedent(
        """
        import torch
        from ..errors import ConfigError, DefocusError as DE
        from ..layers.scan import (
            selective_scan,
        )


        def f():
            from . import base
            from defocus_clip.layers import rope
            return base, rope
        """
    )
    text, deps = _rewrite(source, "defocus_clip.towers.mamba", False, Path("mamba.py"))
    assert "from .defocus_errors import ConfigError, DefocusError as DE" in text
    assert "from .defocus_layers_scan import selective_scan\n" in text
    assert "    from . import defocus_towers_base as base" in text
    assert "    from . import defocus_layers_rope as rope" in text
    assert deps == {"defocus_clip.errors", "defocus_clip.layers.scan", "defocus_clip.towers.base",
                    "defocus_clip.layers.rope"}
    compile(text, "bundled.py", "exec")
    with pytest.raises(DefocusError, match="cannot be bundled"):
        _rewrite("import defocus_clip.towers\n", "defocus_clip.towers.mamba", False, Path("mamba.py"))
    assert defocus_clip.__version__
