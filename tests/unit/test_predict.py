"""harness.predict in-process: input checks (before any model is loaded), display, and batching that keeps order."""

import io
import json

import pytest
import torch

from harness import predict as P
from harness.config import ModelConfig
from harness.model import load_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny BERT saved as a Hugging Face folder (no training: these tests check plumbing, not skill)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer, model = load_model(ModelConfig(name_or_path="builtin:tiny-bert"), "classifier", ["neg", "pos"], seed=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- input checks: all before torch or transformers load a model ----------------------------------------


def test_model_dir_checks_name_the_problem(tmp_path):
    with pytest.raises(P.PredictError, match="no such folder"):
        P.check_model_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(P.PredictError, match="not a folder"):
        P.check_model_dir(tmp_path / "file")
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "config.json").write_text("{}")
    with pytest.raises(P.PredictError, match=r"no config.json\); did you mean .*best"):
        P.check_model_dir(tmp_path / "run")  # an output_dir instead of its best/
    assert P.check_model_dir(tmp_path / "run" / "best") == tmp_path / "run" / "best"


def test_text_file_lines_stripped_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("first text\n\n   \n  second text  \nthird\n")
    assert P.read_text_file(str(path)) == ["first text", "second text", "third"]


def test_text_file_errors(tmp_path):
    with pytest.raises(P.PredictError, match=r"--file .*missing.txt: cannot read it \(No such file"):
        P.read_text_file(str(tmp_path / "missing.txt"))
    with pytest.raises(P.PredictError, match="cannot read it"):
        P.read_text_file(str(tmp_path))  # a folder
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(P.PredictError, match="latin1.txt: not UTF-8 text"):
        P.read_text_file(str(tmp_path / "latin1.txt"))


def test_texts_and_file_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        P.parse_args(["--model", "m", "--file", "f.txt", "some text"])
    assert exc.value.code == 2 and "not both" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--batch-size", "--max-length"])
def test_sizes_must_be_positive(option, capsys):
    with pytest.raises(SystemExit) as exc:
        P.parse_args(["--model", "m", option, "0", "text"])
    assert exc.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_bad_input_exits_2_with_one_message(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cases = [
        (["--model", str(tmp_path / "nope"), "x"], "--model", "no such folder"),
        (["--model", str(tmp_path), "x"], "--model", "no config.json"),
        (["--model", str(tiny_model_dir), "--file", str(tmp_path / "none.txt")], "--file", "cannot read it"),
        (["--model", str(tiny_model_dir), "   "], "the arguments", "no texts to classify"),
    ]
    for argv, names, problem in cases:
        assert P.main(argv) == P.EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith("error: ") and names in err and problem in err, err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    assert P.main(["--model", str(tiny_model_dir)]) == P.EXIT_BAD_INPUT
    assert "no texts to classify: stdin held no non-blank text" in capsys.readouterr().err


def test_max_length_over_the_model_limit_is_bad_input(tiny_model_dir, capsys):
    assert P.main(["--model", str(tiny_model_dir), "--max-length", "513", "great"]) == P.EXIT_BAD_INPUT
    assert "--max-length: 513 exceeds the model's limit of 512 tokens" in capsys.readouterr().err


# ---- display --------------------------------------------------------------------------------------------


def test_display_line_aligned_one_line_and_truncated():
    long = {"text": "word " * 40, "label": "pos", "score": 0.98765, "probabilities": {}}
    short = {"text": "two\nlines", "label": "neutral", "score": 0.5, "probabilities": {}}
    line = P.format_line(long, label_width=7, width=30)
    assert line.startswith("pos      0.9877  word word") and line.endswith("…")
    assert len(line) == len("pos      0.9877  ") + 30
    assert P.format_line(short, label_width=7) == "neutral  0.5000  two lines"


# ---- batching -------------------------------------------------------------------------------------------


def test_batched_sorted_predictions_equal_one_at_a_time_in_input_order(tiny_model_dir):
    # Mixed lengths, so that length sorting reorders them and padding differs between batch sizes.
    texts = [
        "great " * 30 + "film",
        "awful",
        "the film was dull and boring but the music was superb",
        "excellent",
        "terrible terrible " * 10,
        "a wonderful story",
        "the plot",
    ]
    tokenizer, model = P.load_classifier(tiny_model_dir, device="cpu")
    assert not model.training
    batched = P.classify(texts, tokenizer, model, batch_size=3, max_length=64)
    single = [P.classify([t], tokenizer, model, batch_size=1, max_length=64)[0] for t in texts]
    assert [p["text"] for p in batched] == texts
    for b, s in zip(batched, single, strict=True):
        assert b["label"] == s["label"]
        assert set(b["probabilities"]) == {"neg", "pos"}
        assert sum(b["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert b["score"] == max(b["probabilities"].values()) == b["probabilities"][b["label"]]
        for label, p in b["probabilities"].items():
            assert p == pytest.approx(s["probabilities"][label], abs=1e-5)


def test_long_texts_are_truncated_to_max_length(tiny_model_dir):
    tokenizer, model = P.load_classifier(tiny_model_dir, device="cpu")
    long = "great film " * 300  # 600 words: longer than the model's 512 positions
    assert P.resolve_max_length(model, tokenizer, None) == 512
    cut = P.classify([long], tokenizer, model, max_length=8)[0]
    ids = tokenizer(long, truncation=True, max_length=8, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**ids).logits.softmax(-1)[0]
    assert cut["probabilities"]["pos"] == pytest.approx(float(expected[1]), abs=1e-6)
    windows = P.replace(P.plain_spec(model, 8), long_documents="windows", window_stride=2)
    with pytest.raises(
        P.PredictError, match="--long windows: reads single long texts; it does not apply to text pairs"
    ):
        P.classify([long], tokenizer, model, pairs=["a pair"], spec=windows)


def test_jsonl_output_in_process(tiny_model_dir, capsys):
    assert P.main(["--model", str(tiny_model_dir), "--jsonl", "--batch-size", "2", "great", "dull film", "ok"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["great", "dull film", "ok"]
    assert all(set(r) == {"text", "label", "score", "probabilities"} for r in rows)


def test_file_dash_reads_stdin(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("great film\n\nawful film\n"))
    assert P.main(["--model", str(tiny_model_dir), "--file", "-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("great film") and lines[1].endswith("awful film")
