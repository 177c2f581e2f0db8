"""Every encoder family end to end: masked-LM pre-training from a tiny random model folder, then fine-tuning from
its export on 2 gloo ranks with dropout overrides, freezing and layer-wise learning-rate decay."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from tests.conftest import PRETRAIN, read_metrics, read_results, run_harness, tiny_config
from tests.tiny_families import FAMILIES, save_tiny_model

pytestmark = pytest.mark.slow
LR, DECAY = 1e-3, 0.8


def layer_index(name: str) -> int | None:
    found = re.search(r"\.(?:layer|layers|albert_layer_groups)\.(\d+)\.", name)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrain_then_fine_tune_on_two_ranks_with_every_model_setting(family, tmp_path):
    folder = save_tiny_model(family, tmp_path / "model")
    config = tiny_config(tmp_path, data={"synthetic_train_size": 200, "validation_size": 40, "max_length": 48},
                         train={"batch_size": 8, "max_steps": 6, "lr": LR}, logging={"every_steps": 2})  # fmt: skip
    pretrained = tmp_path / "pretrained"
    run_harness(config, f"model.name_or_path={folder}", f"output_dir={pretrained}", entry=PRETRAIN)
    assert read_results(pretrained)["task"] == "masked-lm"
    assert read_results(pretrained)["best"]["validation"]["predicted_tokens"] > 0

    tuned = tmp_path / "tuned"
    proc = run_harness(
        config, f"model.name_or_path={pretrained / 'best'}", f"output_dir={tuned}", "model.dropout=0.2",
        "model.classifier_dropout=0.3", "model.freeze_layers=1", f"train.layer_lr_decay={DECAY}", nproc=2,
    )  # fmt: skip
    results = read_results(tuned)
    assert results["world_size"] == 2 and results["optimizer_steps"] == 6 and results["test"]["samples"] == 101
    assert "learning rates: head 0.001" in proc.stdout and "attention: " in proc.stdout

    # The optimizer's rates are the formula's: head lr, layer k of L lr * d^(L - k), embeddings lr * d^(L + 1).
    layers = 1 if family == "albert" else 3
    (optimizer,) = [r for r in read_metrics(tuned) if r["event"] == "optimizer"]
    for group in optimizer["groups"]:
        for name in group["params"]:
            k = layer_index(name)
            head = group["name"] == "head"
            expected = LR if head else LR * DECAY ** (layers - k if k is not None else layers + 1)
            assert group["lr"] == pytest.approx(expected), name
            assert (k is None) == (group["name"] in ("head", "embeddings")) and k != 0  # layer 0 is frozen

    # The frozen bottom layer (ALBERT: its one shared group) is bitwise the pre-trained one; the rest trained.
    before, after = (
        load_file(str(pretrained / "best" / "model.safetensors")),
        load_file(str(tuned / "final" / "model.safetensors")),
    )
    frozen = [key for key in after if layer_index(key) == 0]
    assert frozen and all(torch.equal(after[key], before[key]) for key in frozen)
    trained = [key for key in after if key in before and key not in frozen and after[key].is_floating_point()]
    assert any(not torch.equal(after[key], before[key]) for key in trained)

    classify = pipeline("text-classification", model=str(tuned / "best"), device="cpu")
    assert classify("a great film")[0]["label"] in {"neg", "pos"}
