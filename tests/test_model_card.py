"""Model cards (`vlm.model_card`): the README.md with hub front matter that every save writes, its round
trip through `read_model_card`, and the cards of `vlm train` and `vlm finetune` runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
import yaml
from test_finetune import _write_colours
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

import vlm
from training.run_log import read_metrics
from vlm.checkpoint import save_pretrained
from vlm.model_card import (
    CLASSIFICATION,
    FORMATS,
    RETRIEVAL,
    ZERO_SHOT,
    ModelCard,
    card_for_run,
    front_matter,
    read_model_card,
    write_model_card,
)

# What opens each format, as the card's snippet must say it.
SNIPPETS = {
    "vlm": "vlm.load(",
    "transformers": 'pipeline("zero-shot-image-classification"',
    "open_clip": "create_model_and_transforms(\"local-dir:",
    "onnx": "OnnxCLIP(",
}
FULL = ModelCard(
    license="apache-2.0",
    datasets=("owner/pairs",),
    metrics={"zeroshot_top1": 0.9722222222222222, "zeroshot_top5": 1.0, "image_to_text_R@1": 0.25},
    training={"data": "hf:owner/pairs", "steps": 100, "lr": 2e-3, "seed": 0, "note": "a | b --> c `x`"},
    base_model="openai/clip-vit-base-patch32",
    eval_data={ZERO_SHOT: "digits/test.csv", RETRIEVAL: "hf:owner/pairs"},
    name="my-clip",
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vlm.create_model("tiny")


def _meta(directory) -> dict:
    text = (directory / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_front_matter_has_the_hub_keys_of_each_format_and_claims_nothing_unknown(model, tmp_path, fmt):
    path = write_model_card(tmp_path, model, fmt=fmt)
    meta, text = _meta(tmp_path), path.read_text()
    assert meta["library_name"] == fmt and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert {"clip", "vision-language", "zero-shot-image-classification"} <= set(meta["tags"])
    assert not {"license", "datasets", "base_model", "metrics", "model-index"} & set(meta)
    assert SNIPPETS[fmt] in text and all(s not in text for f, s in SNIPPETS.items() if f != fmt)
    assert "Not measured" in text and "## Training" not in text
    config = json.loads(text.split("```json\n")[1].split("\n```")[0])
    assert vlm.CLIPConfig.from_dict(config) == model.config
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in text
    assert read_model_card(tmp_path) == ModelCard()


def test_full_card_front_matter_is_what_the_hub_reads(model, tmp_path):
    from huggingface_hub import ModelCard as HubCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    path = write_model_card(tmp_path, model, fmt="transformers", card=FULL)
    hub = HubCard(path.read_text())  # huggingface_hub's own parser, offline
    assert hub.data.license == "apache-2.0" and hub.data.datasets == ["owner/pairs"]
    assert hub.data.base_model == "openai/clip-vit-base-patch32" and hub.data.library_name == "transformers"
    name, results = model_index_to_eval_results(_meta(tmp_path)["model-index"])
    assert name == "my-clip"
    measured = {(r.task_type, r.metric_name): (r.metric_value, r.dataset_name) for r in results}
    assert measured == {
        (ZERO_SHOT, "zero-shot top-1 accuracy"): (FULL.metrics["zeroshot_top1"], "digits/test.csv"),
        (ZERO_SHOT, "zero-shot top-5 accuracy"): (1.0, "digits/test.csv"),
        (RETRIEVAL, "image-to-text recall@1"): (0.25, "hf:owner/pairs"),
    }
    assert "*id" not in path.read_text()  # no YAML aliases: every result spells its dataset out
    assert "| zero-shot top-1 accuracy (`zeroshot_top1`) | 0.9722 |" in path.read_text()


def test_a_card_written_in_a_staging_directory_names_the_final_one(model, tmp_path):
    from vlm.files import atomic_directory

    with atomic_directory(tmp_path / "my-export") as staging:  # how the exporters write
        write_model_card(staging, model, fmt="onnx")
    text = (tmp_path / "my-export" / "README.md").read_text()
    assert "# my-export\n" in text and 'OnnxCLIP("path/to/my-export")' in text and ".tmp" not in text


def test_round_trip_card_readme_card(model, tmp_path):
    write_model_card(tmp_path, model, fmt="vlm", card=FULL)
    assert read_model_card(tmp_path) == FULL
    tupled = dataclasses.replace(FULL, training={"sizes": (1, 2)}, eval_data={})
    write_model_card(tmp_path, model, fmt="onnx", card=tupled)
    assert read_model_card(tmp_path) == tupled  # JSON's lists already in the card, so equal after the trip


def test_hand_edits_of_the_front_matter_win(model, tmp_path):
    path = write_model_card(tmp_path, model, fmt="vlm", card=FULL)
    path.write_text(path.read_text().replace("license: apache-2.0", "license: mit"))
    card = read_model_card(tmp_path)
    assert card.license == "mit" and card.metrics == FULL.metrics


def test_readmes_vlm_did_not_write(tmp_path, caplog):
    assert read_model_card(tmp_path) is None
    readme = tmp_path / "README.md"
    readme.write_text("# Notes\n\nno front matter here\n")
    assert read_model_card(tmp_path) is None
    readme.write_text("---\nlicense: mit\ndatasets: owner/set\nbase_model: [a/b]\n---\n# hub card\n")
    assert read_model_card(tmp_path) == ModelCard(license="mit", datasets=("owner/set",))
    readme.write_text("---\nlicense: [unclosed\n---\n<!-- vlm-model-card {broken -->\n")
    with caplog.at_level(logging.WARNING, logger="vlm.model_card"):
        assert read_model_card(tmp_path) is None
    assert "not valid YAML" in caplog.text and "damaged" in caplog.text
    assert front_matter("no front matter") == {}


def test_save_pretrained_writes_the_card_and_load_restores_it(model, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("my own notes")  # the model's card replaces it (documented)
    save_pretrained(model, tmp_path / "a", card=FULL)
    loaded = vlm.load(tmp_path / "a")
    assert loaded.card == FULL and _meta(tmp_path / "a")["library_name"] == "vlm"
    assert vlm.checkpoint.load_pretrained(tmp_path / "a").card == FULL
    # Saved again (here, another vlm directory) without a card: the loaded model's card goes along.
    loaded.save_pretrained(tmp_path / "b")
    assert read_model_card(tmp_path / "b") == FULL
    # A directory saved before cards existed still loads, without a card.
    (tmp_path / "b" / "README.md").unlink()
    assert vlm.load(tmp_path / "b").card is None
    assert vlm.checkpoint.load_pretrained(tmp_path / "b").card is None
    model.save_pretrained(tmp_path / "c")  # a fresh model has no card: an empty one is written
    assert read_model_card(tmp_path / "c") == ModelCard()


def test_bad_cards_are_refused_with_the_fix(model, tmp_path):
    with pytest.raises(ValueError, match=r"metrics\['zeroshot_top1'\] is nan.*leave the metric out"):
        ModelCard(metrics={"zeroshot_top1": math.nan})
    with pytest.raises(TypeError, match="sequence of names, got the string 'owner/set'"):
        ModelCard(datasets="owner/set")
    with pytest.raises(ValueError, match="JSON values"):
        ModelCard(training={"model": model})
    with pytest.raises(ValueError, match="unknown model card format 'gguf'; expected one of vlm, transformers"):
        write_model_card(tmp_path, model, fmt="gguf")
    with pytest.raises(TypeError, match="ModelCard, got dict"):
        write_model_card(tmp_path, model, fmt="vlm", card={"license": "mit"})
    assert not (tmp_path / "README.md").exists()


def test_card_for_run_names_only_what_it_knows(tmp_path):
    local = tmp_path / "pairs.csv"
    local.write_text("image,text\n")
    card = card_for_run(
        data=str(local),
        eval_data={ZERO_SHOT: "hf:owner/labelled:test", RETRIEVAL: str(local)},
        metrics={"zeroshot_top1": 0.5, "zeroshot_top5": math.nan},
        base_model=str(tmp_path),
        steps=3,
        lr=None,
    )
    assert card.datasets == ("owner/labelled",)  # a hub id; the local table stays in `training`
    assert card.metrics == {"zeroshot_top1": 0.5}  # NaN is no figure
    assert card.eval_data == {ZERO_SHOT: "hf:owner/labelled:test"}  # no retrieval metric, no retrieval data
    assert card.base_model is None
    assert card.training == {"data": str(local), "steps": 3, "initialised_from": str(tmp_path)}
    hub_id = "openai/clip-vit-base-patch32"
    assert card_for_run(data="x", base_model=hub_id).base_model == hub_id


def test_a_fine_tuned_classifier_gets_an_image_classification_card(model, tmp_path):
    from training.classifier import ImageClassifier

    classifier = ImageClassifier.from_clip(model, ["red", "green", "blue"])
    card = ModelCard(metrics={"top1": 0.75, "shifted_top1": 0.5}, eval_data={CLASSIFICATION: "colours/test"})
    text = write_model_card(tmp_path, classifier, fmt="vlm", card=card).read_text()
    meta = _meta(tmp_path)
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["model-index"][0]["results"][0]["task"]["type"] == CLASSIFICATION
    assert "over 3 classes" in text and "ImageClassifier.from_pretrained(" in text and "text tower" not in text
    assert json.loads(text.split("```json\n")[1].split("\n```")[0])["class_names"] == ["red", "green", "blue"]
    assert read_model_card(tmp_path) == card


@pytest.mark.usefixtures("one_thread")
def test_finetune_card_has_the_accuracy_the_job_measured(model, tmp_path):
    from training.finetune_config import load_finetune_config
    from training.finetune_job import run_finetune

    _write_colours(tmp_path / "data" / "train", 4, seed=0)
    _write_colours(tmp_path / "data" / "test", 2, seed=1)
    overrides = [f"data.train={tmp_path / 'data'}", f"model.name={model.save_pretrained(tmp_path / 'base')}",
                 f"output_dir={tmp_path / 'out'}", "recipe.epochs=1", "recipe.batch_size=6",
                 "wise_ft.sweep=[1.0]", "logging.progress=false"]  # fmt: skip
    report = run_finetune(load_finetune_config(None, overrides))
    card = read_model_card(tmp_path / "out")
    measured = json.loads((tmp_path / "out" / "metrics.json").read_text())["finetuned"]
    assert card.metrics["top1"] == measured["test"]["top1"] == report.finetuned["test"].top1
    assert card.metrics["shifted_top1"] == measured["shifted"]["top1"]
    assert card.eval_data == {CLASSIFICATION: str(tmp_path / "data" / "test")}
    assert card.training["epochs"] == 1 and card.training["initialised_from"] == str(tmp_path / "base")
    assert _meta(tmp_path / "out")["pipeline_tag"] == "image-classification"


@pytest.mark.usefixtures("one_thread")
def test_train_card_carries_the_last_evaluation(tmp_path):
    from training.config import load_config
    from training.loop import train

    data = write_pairs(tmp_path / "data", 16)
    overrides = {"output_dir": tmp_path / "run", "data.train": data, "data.eval": data, "eval.zeroshot": data,
                 "data.batch_size": 8, "data.num_workers": 0, "model.name": "tiny", "schedule.steps": 2,
                 "schedule.warmup_steps": 1, "eval.every": 1, "checkpoint.every": 0, "logging.progress": False,
                 "logging.plot": False}  # fmt: skip
    result = train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    card = vlm.load(result.model_dir).card
    assert card.metrics == result.metrics and {"zeroshot_top1", "image_to_text_R@1"} <= set(card.metrics)
    assert card.eval_data == {ZERO_SHOT: str(data), RETRIEVAL: str(data)}
    assert card.training["steps"] == 2 and card.training["batch_size"] == 8 and card.training["preset"] == "tiny"
    assert card.datasets == () and card.base_model is None and card.name == "run"


@pytest.mark.slow
def test_digits_run_card_has_the_zeroshot_top1_the_run_measured(digits_run):
    _, result = digits_run
    last = [row for row in read_metrics(result.run_dir / "metrics.jsonl") if "eval/zeroshot_top1" in row][-1]
    card = read_model_card(result.model_dir)
    assert card.metrics["zeroshot_top1"] == last["eval/zeroshot_top1"] == result.metrics["zeroshot_top1"]
    results = _meta(result.model_dir)["model-index"][0]["results"]
    (zeroshot,) = [r for r in results if r["task"]["type"] == ZERO_SHOT]
    top1 = {"type": "accuracy", "value": last["eval/zeroshot_top1"], "name": "zero-shot top-1 accuracy"}
    assert zeroshot["metrics"][0] == top1
    assert card.training["steps"] == result.step == 100 and card.training["lr"] == 2e-3
