"""Text pairs, multi-label and regression end to end: a short training run, then its best model evaluated on
2 gloo ranks: the gathered scores equal the one-process run's on odd-sized sets (101 test, 61 validation)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_results, run_harness, tiny_config
from tests.table_data import write_multilabel, write_pairs, write_regression

pytestmark = pytest.mark.slow

CASES = {
    # Tiny BERT needs 100 steps or more before it reads the second segment (measured: chance at 60 steps).
    "pairs": (write_pairs, ["data.text_column=premise", "data.text_pair_column=hypothesis", "data.labels=[neg,pos]",
                            "data.max_length=96", "train.max_steps=160"], "accuracy"),
    "multi_label": (lambda f: write_multilabel(f, "list"), ["task.problem_type=multi_label", "data.label_column=tags",
                    "data.labels=[praise,complaint,long]"], "f1_micro"),
    "regression": (write_regression, ["task.problem_type=regression", "data.label_column=score"], "spearman"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_score_the_best_model_exactly_as_one_process(case, tmp_path):
    write, overrides, metric = CASES[case]
    folder = write(tmp_path / "data")
    config = tiny_config(tmp_path, data={"source": "path", "path": str(folder), "max_length": 48},
                         train={"max_steps": 40, "batch_size": 16, "lr": 2e-3}, eval={"batch_size": 8})  # fmt: skip
    run_harness(config, *overrides)
    trained = read_results(tmp_path / "run")
    assert trained["test"]["samples"] == 101 and trained["best"]["validation"]["samples"] == 61
    # A model that learned something (so equal scores are not equal constants): measured 0.73 accuracy on
    # pairs, 0.93 micro F1 on the tags, Spearman 0.81 on the scores (2-core EPYC, 2026-12-01).
    assert trained["test"][metric] > 0.6, trained["test"]

    two = tmp_path / "two"
    run_harness(config, *overrides, "train.max_steps=0", f"model.name_or_path={tmp_path / 'run' / 'best'}",
                f"output_dir={two}", nproc=2)  # fmt: skip
    again = read_results(two)
    assert again["world_size"] == 2
    for split_one, split_two in (
        (trained["test"], again["test"]),
        (trained["best"]["validation"], again["best"]["validation"]),
    ):
        assert split_two.keys() == split_one.keys()
        for name, value in split_one.items():
            if name == "loss" or isinstance(value, float):
                assert split_two[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
            else:
                assert split_two[name] == value, name
    predictions = [json.loads(line) for line in (two / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 101 and [p["index"] for p in predictions] == list(range(101))

    # The run report shows the problem type's own scores (and a confusion matrix for classes only).
    from harness.report import write_report

    html = write_report(tmp_path / "run").read_text()
    assert f"<th>{metric}</th>" in html and ("Test confusion matrix" in html) == (case == "pairs")

    # Served as trained: the export's harness.json says how to read the input, pairs included.
    if case == "pairs":
        import pandas as pd

        from tests import ranks

        frame = pd.read_parquet(folder / "test.parquet")
        rows = [{"premise": a, "hypothesis": b} for a, b in zip(frame["premise"], frame["hypothesis"], strict=True)]
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        served = ranks.run("predict", ["--model", str(tmp_path / "run" / "best"), "--file", str(tmp_path / "pairs.jsonl"),
                                       "--jsonl"])  # fmt: skip
        labels = [json.loads(line)["label"] for line in served.stdout.splitlines()]
        expected = [json.loads(line)["prediction"] for line in (tmp_path / "run" / "test_predictions.jsonl").open()]
        assert labels == expected
        single = ranks.run("predict", ["--model", str(tmp_path / "run" / "best"), "premise only"], check=False)
        assert single.returncode == 2 and "trained on text pairs (premise, hypothesis)" in single.stderr
