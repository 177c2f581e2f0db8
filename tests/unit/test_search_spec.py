"""Search files: the shipped ones load; mistakes are named with their key before anything runs."""

import pytest
import yaml

from harness.config import ConfigError
from launch.search import SearchSpec, main, trial_overrides
from tests.conftest import ROOT

SEARCHES = sorted((ROOT / "configs" / "search").glob("*.yaml"))


@pytest.mark.parametrize("path", SEARCHES, ids=[p.name for p in SEARCHES])
def test_shipped_searches_load(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = SearchSpec.load(path)
    assert spec.space and spec.trials >= spec.parallel >= 1 and spec.metric == "loss"


def test_mistakes_are_named_with_their_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "config": "configs/quickstart.yaml", "output_dir": str(tmp_path / "s"), "trails": 8, "parallel": 0,
        "pruner": {"name": "hyperband"},
        "space": {"train.lr": {"log_float": [0, 1e-3]}, "train.warmup_steps": {"int": [5, 1]},
                  "train.dropout": {"uniform": [0, 1]}, "train.nonsense": {"float": [0, 1]}},
    }))  # fmt: skip
    with pytest.raises(ConfigError) as error:
        SearchSpec.load(bad)
    text = str(error.value)
    for expected in ("unknown key 'trails'", "parallel must be an integer >= 1", "pruner.name", "log_float needs low > 0",
                     "space.train.warmup_steps: low 5 must be below high 1", "space.train.dropout: one of float"):  # fmt: skip
        assert expected in text, text
    assert main([str(bad)]) == 2 and "error:" in capsys.readouterr().err and not (tmp_path / "s").exists()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"config": "configs/quickstart.yaml", "output_dir": str(tmp_path / "s"),
                                       "space": {"train.nonsense": {"float": [0, 1]}}}))  # fmt: skip
    with pytest.raises(ConfigError, match="space.train.nonsense: not a config key"):
        SearchSpec.load(unknown)


def test_trial_values_become_overrides():
    assert trial_overrides({"train.lr": 1e-4, "model.name_or_path": "a b", "train.batch_size": 16}) == [
        "train.lr=0.0001", 'model.name_or_path="a b"', "train.batch_size=16"]  # fmt: skip
