"""Training behaviours that need a real run."""

import pytest

from tests.conftest import read_metrics, read_results, run_harness, start_harness, tiny_config

pytestmark = pytest.mark.slow


def test_early_stopping_and_best_model_selection(tmp_path):
    # A learning rate too small to change predictions: accuracy never improves after the first validation.
    config = tiny_config(tmp_path, train={"lr": 1e-12, "max_steps": 20},
                         eval={"every_steps": 2, "metric": "accuracy", "patience": 2})  # fmt: skip
    proc = run_harness(config)
    results = read_results(tmp_path / "run")
    assert results["optimizer_steps"] == 6, "validations at steps 2 (best), 4 and 6 (no improvement: stop)"
    assert results["best"]["step"] == 2 and results["best"]["metric"] == "accuracy"
    assert "early stopping" in proc.stdout
    evals = [r["step"] for r in read_metrics(tmp_path / "run") if r["event"] == "eval" and r["split"] == "validation"]
    assert evals == [2, 4, 6]
    # Killed during its finish (no status, no results): the same command resumes from the last step's checkpoint
    # into the finish alone; early stopping still holds, nothing trains again.
    for name in ("exit_status.json", "results.json"):
        (tmp_path / "run" / name).unlink()
    run_harness(config)
    again = read_results(tmp_path / "run")
    assert again["resumed_from_step"] == 6 and again["optimizer_steps"] == 6 and again["best"]["step"] == 2
    assert again["test"] == results["test"]


def test_a_test_split_without_labels_gets_predictions_and_no_metrics(tmp_path):
    import pandas as pd

    repo = tmp_path / "glue-like"
    (repo / "data").mkdir(parents=True)
    words = ["great", "awful", "fine", "dull", "superb", "bad"]
    for split, n, labelled in (("train", 60, True), ("validation", 12, True), ("test", 9, False)):
        texts = [f"a {words[i % 6]} film number {i}" for i in range(n)]
        labels = [int(words[i % 6] in ("great", "fine", "superb")) if labelled else -1 for i in range(n)]
        pd.DataFrame({"sentence": texts, "label": labels}).to_parquet(repo / "data" / f"{split}-00000-of-00001.parquet")
    config = tiny_config(tmp_path, data={"source": "hub", "dataset": str(repo), "text_column": "sentence",
                                         "validation_split": "validation"}, train={"max_steps": 4})  # fmt: skip
    proc = run_harness(config)
    results = read_results(tmp_path / "run")
    assert results["test"] == {"samples": 9, "labelled": False} and "loss" in results["best"]["validation"]
    assert "the test split has no labels: 9 predictions" in proc.stdout
    rows = (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()
    assert len(rows) == 9 and all('"prediction"' in row and '"label"' not in row for row in rows)


def test_augmented_training_learns_is_reproducible_and_leaves_evaluation_alone(tmp_path):
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("film, movie, picture\nplot, story\n")
    ops = ["word_dropout:0.1", "swap:0.05", "synonym:0.3"]
    config = tiny_config(
        tmp_path,
        data={"synthetic_train_size": 2400, "validation_size": 200},
        train={"max_steps": 80, "batch_size": 32, "lr": 1e-3},
        augment={"ops": ops, "synonyms_path": str(synonyms)},
    )
    losses = {}
    for name in ("a", "b"):
        run_harness(config, f"output_dir={tmp_path / name}")
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name) if r["event"] == "train"]
    assert len(losses["a"]) == 16 and losses["a"] == losses["b"]  # the same seed draws the same augmentations
    assert read_results(tmp_path / "a")["test"]["accuracy"] > 0.85  # learns through the noise (measured 0.95)
    for name, augment_ops in (("a-eval", ",".join(ops)), ("plain-eval", "[]")):  # evaluation is never augmented
        run_harness(config, f"output_dir={tmp_path / name}", "train.max_steps=0", f"augment.ops={augment_ops}")
    assert read_results(tmp_path / "a-eval")["test"] == read_results(tmp_path / "plain-eval")["test"]


def test_training_log_and_results_report_mfu(tmp_path):
    config = tiny_config(tmp_path, train={"max_steps": 12}, logging={"every_steps": 4, "progress": "plain"})
    proc = run_harness(config)
    results = read_results(tmp_path / "run")
    assert results["peak_source"] == "measured" and results["peak_tflops"] > 0
    assert 0 < results["train_mfu"] < 1
    assert results["train_mfu"] == pytest.approx(results["train_tflops_per_s"] / results["peak_tflops"])
    rows = [r for r in read_metrics(tmp_path / "run") if r["event"] == "train"]
    assert [r["step"] for r in rows] == [4, 8, 12] and all(0 < r["mfu"] < 1 for r in rows)
    assert " mfu " in proc.stdout

    # A given peak (per process) replaces the measurement: 2 processes have twice the peak.
    out = tmp_path / "given"
    run_harness(config, f"output_dir={out}", "logging.peak_tflops=0.5", nproc=2)
    given = read_results(out)
    assert given["peak_source"] == "logging.peak_tflops" and given["peak_tflops"] == pytest.approx(1.0)
    assert given["train_mfu"] == pytest.approx(given["train_tflops_per_s"] / 1.0)


def test_compiled_model_trains_like_the_eager_one_with_few_graphs(tmp_path):
    # Dropout off: inductor draws dropout masks differently from eager PyTorch, everything else must agree.
    config = tiny_config(tmp_path, model={"name_or_path": "builtin:tiny-bert", "dropout": 0.0,
                                          "classifier_dropout": 0.0},
                         data={"synthetic_train_size": 1600}, train={"max_steps": 60, "batch_size": 32},
                         logging={"every_steps": 15, "progress": "plain"})  # fmt: skip
    # Side by side: the eager run uses the core that inductor's compilation leaves idle.
    eager_run = start_harness(config, f"output_dir={tmp_path / 'eager'}")
    proc = run_harness(config, f"output_dir={tmp_path / 'compiled'}", "train.compile=true", timeout=900)
    assert eager_run.wait().returncode == 0, eager_run.stderr()[-3000:]
    eager, compiled = read_results(tmp_path / "eager"), read_results(tmp_path / "compiled")
    # 60 length-bucketed steps and 2 evaluations have dozens of distinct (batch, length) shapes; dynamic
    # shapes keep the graphs to a handful (train forward/backward, eval forward, a few guard recompiles).
    assert 1 <= compiled["compiled_graphs"] <= 8, compiled["compiled_graphs"]
    assert "torch.compile: " in proc.stdout
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if r["event"] == "train"]
              for name in ("eager", "compiled")}  # fmt: skip
    assert len(losses["compiled"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    assert eager["test"]["accuracy"] > 0.7  # a trained model, so equal accuracies mean something
    assert compiled["test"]["accuracy"] == pytest.approx(eager["test"]["accuracy"], abs=0.01)


def test_fast_cpu_dropout_learns_like_torchs_dropout(tmp_path):
    # Same drop probabilities (tiny-bert: 0.1 everywhere), different random masks: equally good models.
    config = tiny_config(tmp_path, data={"synthetic_train_size": 2400, "validation_size": 200,
                         "synthetic_test_size": 400}, train={"max_steps": 80, "batch_size": 32}, logging={"every_steps": 20, "progress": "plain"})  # fmt: skip
    fast = run_harness(config, f"output_dir={tmp_path / 'fast'}")
    torch_dropout = run_harness(config, f"output_dir={tmp_path / 'torch'}", "train.fast_cpu_dropout=false")
    assert "fast CPU dropout: 8 dropout modules, 1 attention implementation(s) swapped" in fast.stdout
    assert "fast CPU dropout" not in torch_dropout.stdout
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if r["event"] == "train"]
              for name in ("fast", "torch")}  # fmt: skip
    assert losses["fast"] != losses["torch"], "other masks, other trajectory"
    accuracy = {name: read_results(tmp_path / name)["test"]["accuracy"] for name in ("fast", "torch")}
    assert min(accuracy.values()) > 0.8, accuracy
    assert abs(accuracy["fast"] - accuracy["torch"]) < 0.08, accuracy  # measured 0.93 / 0.91 on 400
