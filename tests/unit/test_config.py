from pathlib import Path

import pytest
import yaml

from harness.config import ConfigError, ExperimentConfig, PretrainConfig, config_from_dict, load_config
from tests.conftest import ROOT, run_harness, tiny_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_experiment_config_loads(path):
    # configs/pretrain_*.yaml are harness/pretrain.py's (they have an `mlm` section); the rest harness/train.py's.
    cls = PretrainConfig if path.name.startswith("pretrain_") else ExperimentConfig
    cfg = load_config(path, cls=cls)
    assert type(cfg) is cls


def test_pretraining_keys_belong_to_pretraining_only(tmp_path):
    with pytest.raises(ConfigError, match="mlm: unknown key"):
        load_config(tiny_config(tmp_path), ["mlm.mask_probability=0.2"])
    cfg = load_config(tiny_config(tmp_path), ["mlm.mask_probability=0.2"], cls=PretrainConfig)
    assert cfg.mlm.mask_probability == 0.2 and cfg.mlm.whole_word_masking
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(tmp_path), ["mlm.mask_probability=1.5", "eval.metric=f1_macro"], cls=PretrainConfig)
    assert "mlm.mask_probability: must be in (0, 1)" in str(err.value) and "eval.metric" in str(err.value)


def test_contract_keys_and_override_types(tmp_path):
    cfg = load_config(
        tiny_config(tmp_path),
        [
            "output_dir=/tmp/x", "seed=3", "model.name_or_path=some/model", "data.source=path", "data.path=/d",
            "data.max_length=256", "data.max_train_samples=2000", "data.max_eval_samples=null", "train.epochs=2",
            "train.max_steps=0", "train.batch_size=4", "train.grad_accum=2", "train.lr=3e-5", "train.precision=bf16",
        ],
    )  # fmt: skip
    assert cfg.output_dir == "/tmp/x" and cfg.seed == 3
    assert cfg.model.name_or_path == "some/model"
    assert (cfg.data.source, cfg.data.path, cfg.data.max_length) == ("path", "/d", 256)
    assert cfg.data.max_train_samples == 2000 and cfg.data.max_eval_samples is None
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum) == (2, 0, 4, 2)
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.precision == "bf16"


def test_typo_names_key_and_suggests_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(tmp_path), ["train.lrr=1e-4", "data.max_lenght=3"])
    message = str(err.value)
    assert "train.lrr: unknown key (did you mean 'train.lr'?)" in message
    assert "data.max_lenght: unknown key (did you mean 'data.max_length'?)" in message


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"batchsize": 3}, "modell": {}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.batchsize: unknown key (did you mean 'train.batch_size'?)" in str(err.value)
    assert "modell: unknown key (did you mean 'model'" in str(err.value)


def test_wrong_types_and_impossible_values_are_all_reported(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(tmp_path), ["train.batch_size=many", "train.precision=fp8", "train.lr=-1"])
    message = str(err.value)
    assert "train.batch_size: expected an integer, got 'many'" in message
    assert "train.precision: must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'" in message
    # Value checks run once the types are right:
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(tmp_path), ["train.lr=0", "train.batch_size=0", "data.max_length=4"])
    message = str(err.value)
    assert "train.lr: must be > 0, got 0.0" in message
    assert "train.batch_size: must be >= 1, got 0" in message
    assert "data.max_length: must be >= 8, got 4" in message
    # Windows read one text alone: not pairs, not text beside other modalities.
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(tmp_path), ["eval.long_documents=windows", "data.text_pair_column=second",
                                            "model.modalities=[text,tabular]"])  # fmt: skip
    assert "windows reads single long texts; it does not apply to text pairs" in str(err.value)
    assert "windows reads text alone; it does not apply to model.modalities=['text', 'tabular']" in str(err.value)


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="overrides are written key=value"):
        load_config(tiny_config(tmp_path), ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["train.lr=5e-4", "data.labels=[bad,good]"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.data.labels == ["bad", "good"]
    assert again.fingerprint() == cfg.fingerprint()


def test_print_config_cli(tmp_path):
    proc = run_harness(tiny_config(tmp_path), "--print-config", "train.lr=0.25")
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == 0.25 and printed["model"]["name_or_path"] == "builtin:tiny-bert"
    assert not (tmp_path / "run").exists()


def test_bad_config_exits_2_with_the_key_named(tmp_path):
    proc = run_harness(tiny_config(tmp_path), "train.lrr=1", check=False)
    assert proc.returncode == 2
    assert "train.lrr: unknown key (did you mean 'train.lr'?)" in proc.stderr
    assert not Path(tmp_path / "run").exists()


def test_network_bytes_is_refused_where_there_is_no_linux_proc(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.config.sys.platform", "darwin")
    with pytest.raises(ConfigError, match="logging.network_bytes: counts TCP payload through Linux's /proc"):
        load_config(tiny_config(tmp_path), ["logging.network_bytes=true"])
    monkeypatch.undo()
    assert load_config(tiny_config(tmp_path), ["logging.network_bytes=true"]).logging.network_bytes
