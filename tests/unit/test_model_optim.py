import pytest
import torch

from harness.config import ModelConfig, TrainConfig
from harness.evaluation import BestSoFar
from harness.model import TINY_BERT, ModelError, load_model, parameter_groups
from harness.optim import build_optimizer, build_scheduler, lr_multiplier

LABELS = ["neg", "pos"]


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "freeze,frozen_prefixes,trained_prefixes",
    [
        ({"freeze_embeddings": True}, ["bert.embeddings."], ["bert.encoder.layer.0.", "classifier."]),
        ({"freeze_layers": 1}, ["bert.encoder.layer.0."], ["bert.embeddings.", "bert.encoder.layer.1.", "classifier."]),
        ({"freeze_encoder": True}, ["bert.embeddings.", "bert.encoder.", "bert.pooler."], ["classifier."]),
    ],
)
def test_freezing(freeze, frozen_prefixes, trained_prefixes):
    _, model = load_model(ModelConfig(name_or_path=TINY_BERT, **freeze), "classifier", LABELS, seed=0)
    names = trainable(model)
    for prefix in frozen_prefixes:
        assert not any(n.startswith(prefix) for n in names), prefix
    for prefix in trained_prefixes:
        assert any(n.startswith(prefix) for n in names), prefix
    with pytest.raises(ModelError, match="model.freeze_layers: 3 exceeds the 2 layers of this BERT encoder"):
        load_model(ModelConfig(name_or_path=TINY_BERT, freeze_layers=3), "classifier", LABELS, seed=0)


def test_head_size_dropout_and_seeded_init():
    cfg = ModelConfig(name_or_path=TINY_BERT, dropout=0.0, classifier_dropout=0.3)
    _, a = load_model(cfg, "classifier", ["a", "b", "c"], seed=1)
    _, b = load_model(cfg, "classifier", ["a", "b", "c"], seed=1)
    assert a.classifier.out_features == 3 and a.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert a.config.hidden_dropout_prob == 0.0 and a.dropout.p == 0.3
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_no_weight_decay_on_biases_and_layernorm():
    _, model = load_model(ModelConfig(name_or_path=TINY_BERT, freeze_embeddings=True), "classifier", LABELS, seed=0)
    decay, no_decay = parameter_groups(model, weight_decay=0.05, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable(model))  # frozen ones left out


def test_warmup_then_linear_or_cosine_decay():
    assert [round(lr_multiplier(s, 4, 10, "linear"), 4) for s in range(11)] == [
        0.2, 0.4, 0.6, 0.8, 1.0, 0.8333, 0.6667, 0.5, 0.3333, 0.1667, 0.0,
    ]  # fmt: skip
    assert lr_multiplier(7, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(9, 4, 10, "constant") == 1.0
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(
        [{"params": model.parameters()}], TrainConfig(lr=0.1, warmup_ratio=0.4), torch.device("cpu")
    )
    assert optimizer.defaults["fused"] is True
    scheduler = build_scheduler(optimizer, TrainConfig(lr=0.1, warmup_ratio=0.4), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[4] == pytest.approx(0.1) and lrs[0] == pytest.approx(0.02) and scheduler.get_last_lr()[0] == 0.0


def test_best_and_patience():
    best = BestSoFar("accuracy")
    assert best.update(2, {"accuracy": 0.6}) and best.step == 2
    assert not best.update(4, {"accuracy": 0.6}) and best.evals_without_improvement == 1
    assert best.update(6, {"accuracy": 0.7}) and best.evals_without_improvement == 0


def test_compile_is_refused_under_a_deepspeed_launch(monkeypatch):
    from harness.config import ConfigError, config_from_dict
    from harness.distributed import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = config_from_dict({"model": {"name_or_path": "builtin:tiny-bert"}, "train": {"compile": True}})
    with pytest.raises(ConfigError, match="train.compile: not supported under a DeepSpeed launch"):
        build_accelerator(cfg)


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch):
    from harness import distributed

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: False)
    message = distributed.precision_warning(cpu, "bf16")
    assert "train.precision=fp32" in message and "AVX512-BF16" in message
    assert distributed.precision_warning(cpu, "fp32") is None and distributed.precision_warning(cuda, "bf16") is None
    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: True)
    assert distributed.precision_warning(cpu, "bf16") is None
