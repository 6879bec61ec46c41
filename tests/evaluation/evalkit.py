"""Helpers for the evaluation tests: small clip-benchmark `wds/` sets written here, and a model whose answers are
known in advance, so the tests check metric VALUES, not only that files appear.

The model ("code model") reads an integer id from each image (every pixel = 20 * id) and from each text (the word
`item<id>`). Its image embedding for id c is graded, v_j = 1 / (1 + ((j - c) mod D)), and its text embedding is
one-hot at the id t, so the cosine score of text t and image c falls strictly with (t - c) mod D: every ranking
the metrics see is fixed and tie-free, and the expected accuracies and recalls can be worked out by hand.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

D = 12  # embedding width = number of ids
STEP = 20  # pixel value of id i: 20 * i (exact in PNG)
TEMPLATES = ("a photo of {c}.", "an icon of {c}.")


def word(i: int) -> str:
    return f"item{i}"


class CodeModel(torch.nn.Module):
    """CLIP-like model with known answers (see the module docstring)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        ids = (images.float().mean(dim=(1, 2, 3)) * 255 / STEP).round().long()
        dist = (torch.arange(D, device=images.device)[None] - ids[:, None]) % D
        return 1.0 / (1.0 + dist.float())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, D).float()


def code_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([int(re.search(r"item(\d+)", t).group(1)) for t in texts])


code_preprocess = transforms.ToTensor()


def png(code: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (STEP * code,) * 3).save(buf, "PNG")
    return buf.getvalue()


def write_wds(root: Path, samples: list[dict], *, classnames=None, retrieval=False, shards: int = 2) -> Path:
    """clip-benchmark's wds/ layout: test/{0..N-1}.tar + nshards.txt, class names/templates or dataset_type."""
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        with wds.TarWriter(str(root / "test" / f"{s}.tar"), encoder=False) as tar:
            for i, sample in enumerate(samples[s * per:(s + 1) * per], s * per):
                tar.write({"__key__": f"s{i:07d}", **sample})
    (root / "test" / "nshards.txt").write_text(str(shards))
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def classification_samples(n_classes: int, mislabel_second_half: bool) -> list[dict]:
    """2 images per class; with `mislabel_second_half`, the second image of class c is labelled (c + 1) % K."""
    out = []
    for rep in range(2):
        for c in range(n_classes):
            label = (c + 1) % n_classes if (rep == 1 and mislabel_second_half) else c
            out.append({"png": png(c), "cls": str(label).encode()})
    return out


def retrieval_samples() -> list[dict]:
    """12 images with 2 captions each; images 10 and 11 carry each other's id in their captions."""
    swap = {10: 11, 11: 10}
    out = []
    for i in range(D):
        t = swap.get(i, i)
        out.append({"png": png(i), "txt": f"a photo of {word(t)}\nan icon of {word(t)}".encode()})
    return out
