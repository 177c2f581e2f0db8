"""Tracker requests checked before a run starts: a missing tracker names the extra that installs it."""

import pytest

from harness.config import ConfigError
from harness.tracking import check_trackers, flat_scalars


def test_a_tracker_that_is_not_installed_names_its_extra(monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    assert check_trackers(["tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError) as error:
        check_trackers(["mlflow", "trackio", "comet_ml"])
    text = str(error.value)
    assert "'mlflow' is not installed here (pip install -e \".[mlflow]\")" in text
    assert "'trackio' is not installed here (pip install -e \".[trackio]\")" in text
    assert "'comet_ml' is not installed here (pip install comet_ml)" in text


def test_the_config_reaches_trackers_as_flat_scalars():
    tree = {"train": {"lr": 1e-3, "precision": "fp32"}, "data": {"splits": [1, 2]}, "seed": 7}
    assert flat_scalars(tree) == {"train.lr": 1e-3, "train.precision": "fp32", "data.splits": "[1, 2]", "seed": 7}
