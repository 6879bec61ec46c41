"""`defocus-clip diagnose`: over-focus diagnostics (paper appendix B.1) for one or more models.

    defocus-clip diagnose --model DeFocus-Mamba-Tiny-8 --model Causal-Mamba-Tiny-8 --images demo --output out/diag

writes, under --output: `<model>/image<i>_maps.png` (receptive field, attention received, gradient map per layer
over the image), `<model>/image<i>_attention.png` (attention matrices), `<model>/maps.npz` (raw maps),
`compare_<kind>_image<i>.png` (models x layers, like the paper's figure 1) and `summary.json` / `summary.csv`
(entropy and top-5% share of each map, per image and averaged). See docs/diagnostics.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

HELP = "over-focus diagnostics: attention maps, receptive field and gradient maps per layer (paper app. B.1)"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="NAME",
                        help="OpenCLIP model name (e.g. DeFocus-Mamba-B-32) or timm tower name; repeat to compare")
    parser.add_argument("--checkpoint", action="append", metavar="PATH",
                        help="weights: one per --model, or several for a single --model; repeat")
    parser.add_argument("--images", required=True, metavar="DIR|demo",
                        help="'demo' (held-out demo images), a folder of images (captions from same-stem .txt) "
                             "or a WebDataset .tar shard")
    parser.add_argument("--layers", type=int, nargs="+", metavar="L",
                        help="0-based block indices (default: the paper's relative depths, 6 12 18 22 of 24)")
    parser.add_argument("--num-images", type=int, default=4, help="images drawn at random from --images (4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image draw (0)")
    parser.add_argument("--labels", type=int, nargs="+", metavar="CLASS",
                        help="classifier towers: class label(s) of the loss, one for all images or one per image "
                             "(default: the model's own prediction)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="backward passes batched together for the attention map (64); lower it to save memory")
    parser.add_argument("--method", choices=("copies", "batched_grad"), default="copies",
                        help="attention-map batching: copies of the input (works everywhere, default) or "
                             "is_grads_batched (faster, not through custom autograd kernels)")
    parser.add_argument("--plot-images", type=int, default=None,
                        help="per-image figures for the first N images (default: all)")


def _clean(v):
    """Strict JSON: NaN/inf become null, tensors/numpy scalars become floats."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, str | int):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _mean_rows(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), float) and math.isfinite(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def _loss_for(subject, items, labels, device):
    """(layer -> loss builder, description) for the subject's gradient map."""
    import torch

    from .hooks import classifier_loss, clip_loss, image_embedding_norm_loss

    if subject.kind == "clip":
        captions = [it.caption for it in items]
        if all(captions) and len(items) >= 2:
            text = subject.tokenizer(captions).to(device)
            aux = callable(getattr(subject.model, "aux_image_features", None))
            desc = "clip_contrastive" + ("+aux" if aux else "")
            return (lambda layer: clip_loss(subject.model, subject.tower, layer, text)), desc
        reason = "fewer than 2 images" if len(items) < 2 else "images without captions"
        _logger.warning("%s: %s, gradient map of the image-embedding norm instead of the contrastive loss",
                        subject.label, reason)
        return (lambda layer: image_embedding_norm_loss(subject.model, subject.tower, layer)), "image_embedding_norm"
    target = None
    if labels:
        if len(labels) not in (1, len(items)):
            from ..errors import ConfigError

            raise ConfigError(f"--labels: give 1 label or {len(items)} (one per image), got {len(labels)}")
        target = torch.tensor(labels * len(items) if len(labels) == 1 else labels, device=device)
    if not getattr(subject.tower, "num_classes", 0):
        desc = "pooled_feature_norm"
    else:
        desc = "classification_ce" + ("+aux" if getattr(subject.tower, "head2", None) is not None else "")
        desc += "" if target is not None else " (predicted labels)"
    return (lambda layer: classifier_loss(subject.tower, layer, target)), desc


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .core import diagnose_tower, summarize_layer
    from .hooks import check_layers
    from .images import load_images
    from .models import load_subject, pair_models, unique_labels
    from .plots import denormalize, plot_attention_matrices, plot_layer_maps, plot_model_grid

    t0 = time.time()
    out_dir = Path(args.output).expanduser()
    pairs = pair_models(args.model, args.checkpoint)
    items = load_images(args.images, args.num_images, args.seed)
    subjects = [load_subject(m, c, args.device) for m, c in pairs]
    unique_labels(subjects)
    for s in subjects:  # fail on a bad --layers before any long computation
        check_layers(s.tower, args.layers)
    n_plot = len(items) if args.plot_images is None else max(0, min(args.plot_images, len(items)))

    report, csv_rows = [], []
    display: dict[str, dict] = {}  # label -> {"image": [arrays], "maps": [layer -> kind -> array]}
    for s in subjects:
        ts = time.time()
        images = torch.stack([s.preprocess(it.image) for it in items]).to(args.device)
        loss_builder, loss_desc = _loss_for(s, items, args.labels, args.device)
        layer_maps = diagnose_tower(s.tower, images, args.layers, loss_builder,
                                    chunk_size=args.chunk_size, method=args.method)
        mean, std = s.normalization()
        pics = [denormalize(images[i], mean, std) for i in range(len(items))]
        per_image: list[dict] = [{} for _ in items]
        summaries, means, raw = [], [], {}
        for lm in layer_maps:
            rows = summarize_layer(lm, s.tower)
            for i, row in enumerate(rows):
                summaries.append({"layer": lm.layer, "image": items[i].name, **row})
                csv_rows.append({"model": s.label, "layer": lm.layer, "image": items[i].name, **row})
            m = _mean_rows(rows)
            means.append({"layer": lm.layer, **m})
            csv_rows.append({"model": s.label, "layer": lm.layer, "image": "mean", **m})
            disp = lm.display(s.tower)
            for i in range(len(items)):
                per_image[i][lm.layer] = {k: v[i].detach().cpu().numpy() for k, v in disp.items()}
            raw[f"attention_layer{lm.layer}"] = lm.attention.cpu().numpy()
            raw[f"receptive_field_layer{lm.layer}"] = lm.receptive_field.cpu().numpy()
            if lm.gradient is not None:
                raw[f"gradient_layer{lm.layer}"] = lm.gradient.cpu().numpy()
        mdir = out_dir / s.label
        mdir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(mdir / "maps.npz", **raw)
        for i in range(n_plot):
            name = f"{s.label} - {items[i].name}"
            plot_layer_maps(pics[i], per_image[i], mdir / f"image{i}_maps.png", title=name)
            plot_attention_matrices({la: m["attention_matrix"] for la, m in per_image[i].items()},
                                    mdir / f"image{i}_attention.png", title=f"{name}: attention (sequence order)")
        display[s.label] = {"image": pics, "maps": per_image}
        tower = s.tower
        report.append({
            "label": s.label, "model": s.name, "checkpoint": s.checkpoint, "kind": s.kind,
            "tower": type(tower).__name__, "depth": len(tower.blocks), "grid": list(tower.grid_size),
            "class_token": "first" if tower.cls_index() == 0 else "last", "gradient_loss": loss_desc,
            "layers": [lm.layer for lm in layer_maps], "seconds": round(time.time() - ts, 2),
            "mean": means, "per_image": summaries,
        })
        _logger.info("%s: %d layers x %d images in %.1fs", s.label, len(layer_maps), len(items), time.time() - ts)

    for i in range(n_plot):
        for kind in ("attention_matrix", "gradient", "receptive_field"):
            grid = {lab: {la: m[kind] for la, m in d["maps"][i].items() if kind in m} for lab, d in display.items()}
            grid = {lab: v for lab, v in grid.items() if v}
            if grid:
                imgs = None if kind == "attention_matrix" else {lab: d["image"][i] for lab, d in display.items()}
                plot_model_grid(grid, kind, out_dir / f"compare_{kind}_image{i}.png", images=imgs,
                                title=f"{kind.replace('_', ' ')}: {items[i].name}")

    summary = {
        "images": [{"name": it.name, "caption": it.caption} for it in items],
        "source": str(args.images), "seed": args.seed, "method": args.method,
        "normalisation": "each map divided by its max over image tokens (attention: per matrix)",
        "models": report,
    }
    (out_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n")
    fields = ["model", "layer", "image"] + sorted({k for r in csv_rows for k in r} - {"model", "layer", "image"})
    with open(out_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in csv_rows:
            w.writerow({k: ("" if _clean(v) is None else v) for k, v in r.items()})
    print(f"wrote {out_dir} ({len(subjects)} model(s), {len(items)} image(s)) in {time.time() - t0:.1f}s")
    for r in report:
        for m in r["mean"]:
            print(f"  {r['label']:32s} layer {m['layer']:3d}  attn H={m['attention_entropy']:.3f} "
                  f"top5%={m['attention_top5_share']:.3f}  grad H={m.get('gradient_entropy', math.nan):.3f} "
                  f"top5%={m.get('gradient_top5_share', math.nan):.3f}")
    return 0
