"""Metric values on hand-built data sets with a model whose answers are known (see conftest.py)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from evalkit import code_preprocess, code_tokenizer

from defocus_clip.evaluation import evaluate_datasets, resolve_datasets
from defocus_clip.evaluation.results import load_reference, summary_table


def _strict_loads(text: str):
    def reject(const):
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=reject)


def test_classification_values(eval_sets, code_model):
    res = evaluate_datasets(code_model, code_preprocess, code_tokenizer,
                            [str(eval_sets / "cls6_half"), str(eval_sets / "cls3_clean")], batch_size=5)
    # cls6_half: every image's own class ranks first, the (c+1) label second: half the labels are wrong at top-1,
    # all are within the top 5, and each class has one hit out of two labelled samples.
    assert res["wds/cls6_half"] == pytest.approx({"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5})
    clean = res["wds/cls3_clean"]
    assert clean["acc1"] == 1.0 and clean["mean_per_class_recall"] == 1.0
    assert math.isnan(clean["acc5"])  # clip-benchmark: no top-5 with fewer than 5 classes


def test_retrieval_values(eval_sets, code_model):
    res = evaluate_datasets(code_model, code_preprocess, code_tokenizer, str(eval_sets / "retrieval12"),
                            batch_size=5)["wds/retrieval12"]
    # text -> image: the 2 captions of image 10 (saying item11) find image 11 first, image 10 second;
    # the 2 captions of image 11 (saying item10) rank image 11 last of 12.
    # image -> text: image 10 finds image 11's captions first, its own at ranks 3-4; image 11's own are last (23-24).
    assert res == pytest.approx({
        "image_retrieval_recall@1": 20 / 24, "text_retrieval_recall@1": 10 / 12,
        "image_retrieval_recall@5": 22 / 24, "text_retrieval_recall@5": 11 / 12,
        "image_retrieval_recall@10": 22 / 24, "text_retrieval_recall@10": 11 / 12,
    })


def test_recall_k_larger_than_the_set_is_a_clear_error(eval_sets, code_model):
    from defocus_clip.errors import DataError

    with pytest.raises(DataError, match="at least 20 images, the set has 12"):
        evaluate_datasets(code_model, code_preprocess, code_tokenizer, str(eval_sets / "retrieval12"),
                          recall_k=(1, 20))


def test_root_template_and_folder_path_agree(eval_sets, code_model):
    by_template = evaluate_datasets(code_model, code_preprocess, code_tokenizer, ["wds/cls6_half", "wds/retrieval12"],
                                    str(eval_sets / "{dataset}"), batch_size=4)
    by_path = evaluate_datasets(code_model, code_preprocess, code_tokenizer,
                                [str(eval_sets / "cls6_half"), str(eval_sets / "retrieval12")], batch_size=7)
    assert by_template == by_path
    assert list(by_template) == ["wds/cls6_half", "wds/retrieval12"]


def test_outputs_strict_json_and_summary(eval_sets, code_model, tmp_path):
    out = tmp_path / "out"
    evaluate_datasets(code_model, code_preprocess, code_tokenizer,
                      [str(eval_sets / "cls3_clean"), str(eval_sets / "retrieval12")],
                      output_dir=out, model_name="CodeModel", pretrained="hand-built", recall_k=(1, 5))
    rec = _strict_loads((out / "wds_cls3_clean_zeroshot_classification.json").read_text())
    assert rec == {"dataset": "wds/cls3_clean", "model": "CodeModel", "pretrained": "hand-built",
                   "task": "zeroshot_classification", "language": "en",
                   "metrics": {"acc1": 1.0, "acc5": None, "mean_per_class_recall": 1.0}}
    ret = _strict_loads((out / "wds_retrieval12_zeroshot_retrieval.json").read_text())
    assert ret["metrics"]["image_retrieval_recall@1"] == pytest.approx(20 / 24)
    assert set(ret["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)}

    df = pd.read_csv(out / "summary.csv")
    assert list(df.columns[:4]) == ["dataset", "task", "metric", "ours (CodeModel)"]
    row = df[(df.dataset == "wds/retrieval12") & (df.metric == "text_retrieval_recall@5")].iloc[0]
    assert row["ours (CodeModel)"] == pytest.approx(100 * 11 / 12, abs=1e-4)  # percent, like the paper
    assert df[["OpenAI CLIP-B/32", "OpenCLIP-B/32", "De-focus Mamba-B/32"]].isna().all().all()  # no paper numbers
    md = (out / "summary.md").read_text()
    assert "| wds/cls3_clean | zeroshot_classification | acc1 | 100.00 |" in md


def test_summary_puts_the_paper_numbers_beside_ours():
    records = [
        {"dataset": "imagenet1k", "task": "zeroshot_classification", "model": "M", "pretrained": "p",
         "metrics": {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.5}},
        {"dataset": "wds/mscoco_captions", "task": "zeroshot_retrieval", "model": "M", "pretrained": "p",
         "metrics": {f"{d}_retrieval_recall@{k}": 0.1 for d in ("image", "text") for k in (1, 5, 10)}},
    ]
    df = summary_table(records).set_index(["dataset", "metric"])
    top1 = df.loc[("imagenet1k", "acc1")]
    assert (top1["ours (M)"], top1["OpenAI CLIP-B/32"], top1["OpenCLIP-B/32"], top1["De-focus Mamba-B/32"]) == \
        (50.0, 63.3, 62.9, 62.7)
    coco = df.loc["wds/mscoco_captions"]
    assert coco.loc["image_retrieval_recall@1", "De-focus Mamba-B/32"] == 34.6  # text -> image, Table 4
    assert coco.loc["text_retrieval_recall@10", "OpenCLIP-B/32"] == 84.9
    assert pd.isna(df.loc[("imagenet1k", "acc5"), "OpenAI CLIP-B/32"])
    ref = load_reference()
    assert ref["models"] == ["OpenAI CLIP-B/32", "OpenCLIP-B/32", "De-focus Mamba-B/32"]


def test_benchmark_list_files(eval_sets, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\nwds/cls6_half\n\n{eval_sets / 'retrieval12'}  # trailing comment\n")
    specs = resolve_datasets([str(lst)], str(eval_sets / "{dataset_cleaned}"))
    assert [(s.key, s.task) for s in specs] == [("wds/cls6_half", "zeroshot_classification"),
                                                ("wds/retrieval12", "zeroshot_retrieval")]
