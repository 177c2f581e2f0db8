"""Classify (or score) texts with a saved model: a run's `best/` or `final/`, or any Hugging Face classifier folder.

    python -m harness.predict --model runs/quickstart/best "a great film" "dull and boring"
    python -m harness.predict --model runs/quickstart/best --file reviews.txt --jsonl
    python -m harness.predict --model runs/nli/best --file pairs.jsonl          # {"text": ..., "text_pair": ...}
    python -m harness.predict --model runs/nli/best --file premises.txt --pair-file hypotheses.txt
    python -m harness.predict --model runs/imdb/best --file reviews.txt --long windows --stride 128
    python -m harness.predict --model runs/imdb/onnx --backend onnx "a great film"   # python -m harness.export
    cat reviews.txt | python -m harness.predict --model runs/quickstart/best

A run's export carries its input pipeline (harness.json: max_length, truncation, pairs, problem type, labels,
threshold, how it read long texts), and that is how texts are read here by default, so a served model sees
exactly what it was validated on; texts are batched longest first in the run's evaluation batch size, so the
outputs are the run's own. A plain Hugging Face folder is read as transformers would (head truncation at the
model's limit, softmax). Texts come from the arguments, from `--file` (one per line, blank lines skipped; a
.jsonl file holds one JSON object per line with the text, and the pair's second text, under the run's column
names or "text" / "text_pair"; `-` is stdin), or from stdin. Each text gets one output line, in input order: the
label (labels, or the number), its probability and the text, or with `--jsonl` a JSON object. Bad input exits
with code 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from harness.cli import EXIT_BAD_INPUT

# Without a limit in the model's config or tokenizer, inputs are truncated to BERT's usual length.
DEFAULT_MAX_LENGTH = 512
DISPLAY_WIDTH = 80


class PredictError(ValueError):
    """Unusable prediction input; the message names the folder or file at fault."""


def check_model_dir(model_dir: str | Path) -> Path:
    """The model folder, checked before anything heavy is imported so that mistakes fail fast."""
    path = Path(model_dir)
    if not path.exists():
        raise PredictError(f"--model {path}: no such folder")
    if not path.is_dir():
        raise PredictError(f"--model {path}: not a folder")
    if not (path / "config.json").is_file():
        hint = f"; did you mean {path / 'best'}?" if (path / "best" / "config.json").is_file() else ""
        raise PredictError(f"--model {path}: not a model folder (no config.json){hint}")
    return path


def read_texts(source: TextIO, origin: str) -> list[str]:
    """One text per line; surrounding whitespace stripped and blank lines skipped."""
    try:
        return [line.strip() for line in source if line.strip()]
    except UnicodeDecodeError as exc:
        raise PredictError(f"{origin}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def read_text_file(path: str) -> list[str]:
    """Texts of `path`, one per line; `-` reads stdin."""
    if path == "-":
        return read_texts(sys.stdin, "stdin")
    try:
        with open(path, encoding="utf-8") as f:
            return read_texts(f, f"--file {path}")
    except OSError as exc:  # missing, a folder, no permission
        raise PredictError(f"--file {path}: cannot read it ({exc.strerror or exc})") from exc


def read_jsonl(path: str, fields: tuple[str, ...], pair_fields: tuple[str, ...]) -> tuple[list[str], list[str] | None]:
    """Texts (and pairs' second texts) of a JSON-lines file, under the first of `fields` each object has."""
    texts, pairs = [], []
    for number, line in enumerate(read_text_file(path), start=1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PredictError(f"--file {path}, line {number}: not JSON ({exc})") from exc
        text = next((row[f] for f in fields if isinstance(row, dict) and f in row), None)
        if not isinstance(text, str) or not text.strip():
            raise PredictError(f"--file {path}, line {number}: no text under {' or '.join(map(repr, fields))}")
        texts.append(text)
        pair = next((row[f] for f in pair_fields if f in row), None)
        if pair is not None:
            pairs.append(pair)
    if pairs and len(pairs) != len(texts):
        raise PredictError(f"--file {path}: {len(pairs)} of {len(texts)} lines have a second text ({pair_fields[0]})")
    return texts, pairs or None


def load_classifier(model_dir: str | Path, device: str | None = None, trust_remote_code: bool = False):
    """Tokenizer and model from a folder, in eval mode on `device` (default: cuda if available, else cpu);
    `trust_remote_code` runs the code a folder ships (its config's auto_map), as a run with
    model.trust_remote_code exports it."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from harness.model import FUSION_FILE

    path = check_model_dir(model_dir)
    if (Path(path) / FUSION_FILE).is_file():
        raise PredictError(
            f"--model {path}: a multimodal model (its {FUSION_FILE}) needs inputs besides text; "
            "harness.predict classifies text-only models"
        )
    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar would interleave with our output
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise PredictError(f"--model {path}: the model ships its own code (its config.json's auto_map); read "
                               "it, then pass --trust-remote-code to run it") from exc  # fmt: skip
        raise PredictError(f"--model {path}: cannot load a classifier from it: {exc}") from exc
    return tokenizer, model.to(device).eval()


def load_onnx_classifier(model_dir: str | Path):
    """Tokenizer and onnxruntime session of a `python -m harness.export --onnx` folder."""
    from transformers import AutoTokenizer

    from harness.export import ONNX_FILE, ExportError, OnnxClassifier, require_onnx

    path = check_model_dir(model_dir)
    if not (path / ONNX_FILE).is_file():
        raise PredictError(f"--backend onnx: no {ONNX_FILE} in {path}; export one with python -m harness.export "
                           f"{path} --onnx <folder>")  # fmt: skip
    try:
        require_onnx()
    except ExportError as exc:
        raise PredictError(f"--backend onnx: {exc}") from exc
    return AutoTokenizer.from_pretrained(path), OnnxClassifier(path)


def resolve_max_length(model, tokenizer, max_length: int | None) -> int:
    """`max_length`, checked against the model's limit; by default the limit itself (or 512 without one)."""
    from harness.model import max_positions

    limit = max_positions(model, tokenizer)
    known = limit < 10**9  # max_positions' answer when neither config nor tokenizer states a limit
    if max_length is None:
        return limit if known else DEFAULT_MAX_LENGTH
    if max_length < 1:
        raise PredictError(f"--max-length: must be at least 1, got {max_length}")
    if known and max_length > limit:
        raise PredictError(f"--max-length: {max_length} exceeds the model's limit of {limit} tokens")
    return max_length


def plain_spec(model, max_length: int):
    """How a folder without harness.json is read: head truncation at `max_length`, its config's problem type."""
    from harness.objectives import HF_PROBLEM_TYPES
    from harness.serving import ServingSpec

    ours = {theirs: name for name, theirs in HF_PROBLEM_TYPES.items()}.get(model.config.problem_type, "single_label")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if ours != "regression" else []
    return ServingSpec(ours, labels, max_length, "head", 0, "text", None, 0.5, "truncate", 128, "mean", 32)


def classify(texts: list[str], tokenizer, model, batch_size: int = 32, max_length: int = 512,
             pairs: list[str] | None = None, spec=None) -> list[dict]:  # fmt: skip
    """Predictions for `texts` (and their pairs' second texts), in input order, read as `spec` says (default: a
    plain folder's reading at `max_length`). Per text: {"text", "label", "score", "probabilities"} for a
    single-label model, {"text", "labels", "probabilities"} for multi-label, {"text", "value"} for regression."""
    import numpy as np
    import torch

    from harness.data.collate import PadCollator
    from harness.data.tokenize import TextEncoder, takes_token_types
    from harness.objectives import Objective, pool_windows

    if batch_size < 1:
        raise PredictError(f"--batch-size: must be at least 1, got {batch_size}")
    spec = spec or plain_spec(model, max_length)
    token_types = pairs is not None and takes_token_types(tokenizer, model)  # as in training
    encoder = TextEncoder(tokenizer, spec.max_length, spec.truncation, spec.head_tokens, token_types)
    if spec.long_documents == "windows":
        if pairs is not None:
            raise PredictError("--long windows: reads single long texts; it does not apply to text pairs")
        ids, document = encoder.windows_of(encoder.bodies(texts), spec.window_stride)
        types = None
    else:
        ids, types = encoder.encode(texts, pairs)
        document = None
    # Longest first, in batches of the run's evaluation size: the run's own batches, so its own outputs.
    lengths = np.asarray([len(row) for row in ids])
    order = np.argsort(-lengths, kind="stable")
    device = model.device
    collate = PadCollator(tokenizer.pad_token_id, 8 if device.type == "cuda" else None)
    logits = np.empty((len(ids), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            fields = [{"token_type_ids": np.asarray(types[i])} for i in batch] if types else None
            inputs = collate([(i, np.asarray(ids[i]), 0, *([fields[k]] if fields else []))
                              for k, i in enumerate(batch)])  # fmt: skip
            inputs = {k: v.to(device) for k, v in inputs.items() if k not in ("labels", "index")}
            logits[batch] = model(**inputs).logits.float().cpu().numpy()  # host sync: one transfer per batch
    if document is not None:
        logits = pool_windows(logits, document, len(texts), spec.window_pooling)
    objective = Objective(spec.problem_type, tuple(spec.labels), spec.threshold)
    return [{"text": text, **output_row(row)} for text, row in zip(texts, objective.predictions(logits), strict=True)]


def output_row(row: dict) -> dict:
    """An objective's prediction in predict's output terms."""
    if "score" in row:
        return {"label": row["prediction"], "score": row["score"], "probabilities": row["probabilities"]}
    if "probabilities" in row:
        return {"labels": row["prediction"], "probabilities": row["probabilities"]}
    return {"value": row["prediction"]}


def predict(
    texts: list[str],
    model_dir: str | Path,
    batch_size: int | None = None,
    max_length: int | None = None,
    device: str | None = None,
    pairs: list[str] | None = None,
    long: str | None = None,
    stride: int | None = None,
    trust_remote_code: bool = False,
    backend: str = "torch",
) -> list[dict]:
    """Classify `texts` with the model in `model_dir`, read as its export says (see `classify`); `long`
    ("truncate" or "windows"), `stride`, `max_length` and `batch_size` override it."""
    from harness.serving import ServingSpec

    if not texts:
        raise PredictError("no texts to classify")
    if backend == "onnx":
        tokenizer, model = load_onnx_classifier(model_dir)
    else:
        tokenizer, model = load_classifier(model_dir, device, trust_remote_code)
    try:
        spec = ServingSpec.read(Path(model_dir))
    except ValueError as exc:
        raise PredictError(f"--model {model_dir}: {exc}") from exc
    spec = spec or plain_spec(model, resolve_max_length(model, tokenizer, max_length))
    if max_length is not None:
        spec = replace(spec, max_length=resolve_max_length(model, tokenizer, max_length))
    spec = replace(spec, long_documents=long or spec.long_documents, window_stride=stride or spec.window_stride)
    if spec.long_documents == "windows" and not 0 <= spec.window_stride < spec.max_length // 2:
        raise PredictError(f"--stride: tokens shared by consecutive windows, 0 to {spec.max_length // 2 - 1}")
    if pairs is not None and len(pairs) != len(texts):
        raise PredictError(f"--pair-file: {len(pairs)} second texts for {len(texts)} texts")
    if spec.text_pair_column and pairs is None:
        raise PredictError(f"--model {model_dir}: trained on text pairs ({spec.text_column}, {spec.text_pair_column}); "
                           "give the second texts with --pair-file or in a .jsonl --file")  # fmt: skip
    return classify(texts, tokenizer, model, batch_size or spec.batch_size, spec.max_length, pairs, spec)


def format_line(prediction: dict, label_width: int, width: int = DISPLAY_WIDTH) -> str:
    """`label  score  text` (multi-label: the labels; regression: the number), the text on one line and cut."""
    text = " ".join(prediction["text"].split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    if "value" in prediction:
        head = f"{prediction['value']:<{label_width}.4f}"
    elif "labels" in prediction:
        head = f"{','.join(prediction['labels']) or '-':<{label_width}}"
    else:
        head = f"{prediction['label']:<{label_width}}  {prediction['score']:.4f}"
    return f"{head}  {text}"


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.predict",
        description=__doc__.split("\n\n")[0],
        epilog="Without TEXT or --file, texts are read from stdin, one per line.",
    )
    parser.add_argument("--model", required=True, help="model folder, e.g. runs/quickstart/best")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    parser.add_argument("--file", help="one text per line (blank lines skipped), or a .jsonl file; - for stdin")
    parser.add_argument("--pair-file", help="the second text of each pair, one per line, aligned with --file")
    parser.add_argument("--jsonl", action="store_true", help="print JSON lines with every label's probability")
    parser.add_argument("--batch-size", type=positive_int, help="texts per forward pass (default: the run's)")
    parser.add_argument("--max-length", type=positive_int, help="tokens per text (default: the run's, else the limit)")
    parser.add_argument("--long", choices=("truncate", "windows"), help="long texts: cut, or read whole in windows "
                        "whose logits are pooled (default: as the run read them)")  # fmt: skip
    parser.add_argument("--stride", type=int, help="with --long windows: tokens shared by neighbouring windows")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default), or onnx: a python -m harness.export --onnx folder run by onnxruntime",
    )
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the code the model folder ships (a run trained with model.trust_remote_code)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.texts and args.file:
        parser.error("give texts as arguments or with --file, not both")
    if args.pair_file and not args.file:
        parser.error("--pair-file pairs with --file")
    return args


def gather_inputs(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The texts (and second texts of pairs) from the arguments, --file (and --pair-file), or stdin."""
    from harness.serving import ServingSpec

    pairs = None
    if args.texts:
        texts, origin = [t.strip() for t in args.texts if t.strip()], "the arguments"
    elif args.file and args.file.endswith(".jsonl"):
        spec = ServingSpec.read(Path(args.model))
        fields = tuple(dict.fromkeys([spec.text_column if spec else "text", "text"]))
        pair_fields = tuple(
            dict.fromkeys([spec.text_pair_column or "text_pair", "text_pair"] if spec else ["text_pair"])
        )
        texts, pairs = read_jsonl(args.file, fields, pair_fields)
        origin = f"--file {args.file}"
    elif args.file:
        texts, origin = read_text_file(args.file), "stdin" if args.file == "-" else f"--file {args.file}"
        pairs = read_text_file(args.pair_file) if args.pair_file else None
    else:
        if sys.stdin.isatty():
            print("reading texts from stdin, one per line; end with Ctrl-D", file=sys.stderr, flush=True)
        texts, origin = read_texts(sys.stdin, "stdin"), "stdin"
    if not texts:
        raise PredictError(f"no texts to classify: {origin} held no non-blank text")
    return texts, pairs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_model_dir(args.model)  # before reading stdin, so a wrong path does not wait for input
        texts, pairs = gather_inputs(args)
        predictions = predict(texts, args.model, args.batch_size, args.max_length, args.device, pairs, args.long,
                              args.stride, args.trust_remote_code, args.backend)  # fmt: skip
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if args.jsonl:
        lines = [json.dumps(p, ensure_ascii=False) for p in predictions]
    else:
        width = max(len(p.get("label", "")) or len(",".join(p.get("labels", []))) or 10 for p in predictions)
        lines = [format_line(p, width) for p in predictions]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
