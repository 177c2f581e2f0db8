"""Classify texts with a saved model (a run's `best/` or `final/`, or any Hugging Face classifier folder).

    python -m harness.predict --model runs/quickstart/best "a great film" "dull and boring"
    python -m harness.predict --model runs/quickstart/best --file reviews.txt --jsonl
    cat reviews.txt | python -m harness.predict --model runs/quickstart/best

Texts come from the arguments, from `--file` (one per line, blank lines skipped; `-` is stdin), or from stdin
when neither is given. Each text gets one output line, in input order: the label, its probability and the
text (aligned, truncated for display), or with `--jsonl` a JSON object with every label's probability.
Bad input (no model folder, no config.json, an unreadable file, no texts) exits with code 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def load_classifier(model_dir: str | Path, device: str | None = None):
    """Tokenizer and model from a folder, in eval mode on `device` (default: cuda if available, else cpu)."""
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
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PredictError(f"--model {path}: cannot load a classifier from it: {exc}") from exc
    return tokenizer, model.to(device).eval()


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


def classify(texts: list[str], tokenizer, model, batch_size: int = 32, max_length: int = 512) -> list[dict]:
    """Predictions for `texts`, in their order: {"text", "label", "score", "probabilities": {label: p}}."""
    import torch

    if batch_size < 1:
        raise PredictError(f"--batch-size: must be at least 1, got {batch_size}")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    # Similar lengths share a batch, so little compute goes to padding. Character count is a cheap proxy for
    # token count: good enough to group, without tokenizing everything twice.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    probabilities: list[list[float]] = [[] for _ in texts]
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tokenizer(
                [texts[i] for i in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            logits = model(**inputs).logits  # (batch, num_labels)
            # Host sync: one transfer per batch. Softmax in fp32 whatever the model's dtype.
            for i, row in zip(batch, logits.float().softmax(dim=-1).tolist(), strict=True):
                probabilities[i] = row
    predictions = []
    for text, probs in zip(texts, probabilities, strict=True):
        best = max(range(len(labels)), key=probs.__getitem__)
        predictions.append(
            {
                "text": text,
                "label": labels[best],
                "score": probs[best],
                "probabilities": dict(zip(labels, probs, strict=True)),
            }
        )
    return predictions


def predict(
    texts: list[str],
    model_dir: str | Path,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | None = None,
) -> list[dict]:
    """Classify `texts` with the model in `model_dir`; one dict per text, in input order (see `classify`)."""
    if not texts:
        raise PredictError("no texts to classify")
    tokenizer, model = load_classifier(model_dir, device)
    return classify(texts, tokenizer, model, batch_size, resolve_max_length(model, tokenizer, max_length))


def format_line(prediction: dict, label_width: int, width: int = DISPLAY_WIDTH) -> str:
    """`label  score  text`, the text on one line and cut to `width` characters."""
    text = " ".join(prediction["text"].split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return f"{prediction['label']:<{label_width}}  {prediction['score']:.4f}  {text}"


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
    parser.add_argument("--file", help="file with one text per line (blank lines skipped); - for stdin")
    parser.add_argument("--jsonl", action="store_true", help="print JSON lines with every label's probability")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass (default 32)")
    parser.add_argument(
        "--max-length", type=positive_int, help="truncate to this many tokens (default: the model's limit)"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if args.texts and args.file:
        parser.error("give texts as arguments or with --file, not both")
    return args


def gather_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        texts, origin = [t.strip() for t in args.texts if t.strip()], "the arguments"
    elif args.file:
        texts, origin = read_text_file(args.file), "stdin" if args.file == "-" else f"--file {args.file}"
    else:
        if sys.stdin.isatty():
            print("reading texts from stdin, one per line; end with Ctrl-D", file=sys.stderr, flush=True)
        texts, origin = read_texts(sys.stdin, "stdin"), "stdin"
    if not texts:
        raise PredictError(f"no texts to classify: {origin} held no non-blank text")
    return texts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_model_dir(args.model)  # before reading stdin, so a wrong path does not wait for input
        texts = gather_texts(args)
        predictions = predict(texts, args.model, args.batch_size, args.max_length, args.device)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if args.jsonl:
        lines = [json.dumps(p, ensure_ascii=False) for p in predictions]
    else:
        label_width = max(len(p["label"]) for p in predictions)
        lines = [format_line(p, label_width) for p in predictions]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
