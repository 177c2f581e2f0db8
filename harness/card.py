"""Model cards: the `README.md` of every export (`best/`, `final/`), in the Hub's model-card format, generated from
the run's own files (config.yaml, results.json, metrics.jsonl, the export's harness.json), never hand-filled.

The metadata is built with huggingface_hub's own `ModelCardData` and `EvalResult` (library, pipeline tag, base
model, datasets, license where the base model declares one, tags, and a model-index with the validation and
test results the run measured); the prose says what was trained on what, with which settings and hardware, how
fast, how text is read, and how to load the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CARD_FILE = "README.md"
BUILTIN_BASES = {"builtin:all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
"""Built-in model names and the Hub model they are."""
HUB_DATASETS = {"imdb": "stanfordnlp/imdb"}
METRIC_NAMES = {"accuracy": "Accuracy", "f1_macro": "Macro F1", "f1_micro": "Micro F1", "precision": "Precision",
                "recall": "Recall", "subset_accuracy": "Subset accuracy", "mse": "MSE", "mae": "MAE",
                "pearson": "Pearson", "spearman": "Spearman", "loss": "Loss", "perplexity": "Perplexity"}  # fmt: skip
PIPELINE_TAGS = {"classification": "text-classification", "masked-lm": "fill-mask"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _rows(output_dir: Path, event: str) -> list[dict]:
    try:
        lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [row for row in (json.loads(line) for line in lines if line.strip()) if row.get("event") == event]


def _base_card(folder: Path) -> dict:
    """The metadata of a model folder's own card, if it has one."""
    try:
        text = (folder / CARD_FILE).read_text()
    except OSError:
        return {}
    match = re.match(r"^---\n(.*?)\n---", text, re.S)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model(name_or_path: str) -> tuple[str | None, dict]:
    """The Hub id of the model a run started from (None for a random or local one) and that model's card metadata
    where it is at hand (a local folder, the built-in package, the Hub cache): nothing is downloaded."""
    if name_or_path in BUILTIN_BASES:
        from harness.model import resolve_model_path

        return BUILTIN_BASES[name_or_path], _base_card(Path(resolve_model_path(name_or_path)))
    if name_or_path.startswith("builtin:"):
        return None, {}
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():  # a local folder: a previous run's export names its own base model
        card = _base_card(folder)
        return card.get("base_model"), card
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, CARD_FILE)
    except Exception:  # noqa: BLE001  (not a valid repo id: then no card)
        cached = None
    return name_or_path, _base_card(Path(cached).parent) if isinstance(cached, str) else {}


def _dataset(cfg: dict) -> tuple[str | None, str]:
    """(the Hub dataset id, a readable name) of a run's data."""
    data = cfg["data"]
    if data["source"] in HUB_DATASETS:
        return HUB_DATASETS[data["source"]], "IMDB"
    if data["source"] == "hub" and data["dataset"] and not Path(data["dataset"]).expanduser().exists():
        name = data["dataset"] + (f" ({data['dataset_config']})" if data["dataset_config"] else "")
        return data["dataset"], name
    if data["source"] == "synthetic":
        return None, "synthetic reviews (the harness's built-in generator)"
    return None, f"local files ({data['path'] or data['dataset']})"


def _eval_results(run_name: str, task: str, dataset: tuple[str | None, str], results: dict, cfg: dict) -> list:
    from huggingface_hub import EvalResult

    task_type = PIPELINE_TAGS.get(task, "text-classification")
    rows = []
    splits = {"validation": (results.get("best") or {}).get("validation") or {}, "test": results.get("test") or {}}
    for split, scores in splits.items():
        for metric, value in scores.items():
            if metric in METRIC_NAMES and isinstance(value, (int, float)) and value == value:  # finite numbers
                rows.append(EvalResult(task_type=task_type, task_name=task_type.replace("-", " ").capitalize(),
                                       dataset_type=dataset[0] or "local", dataset_name=dataset[1],
                                       dataset_config=cfg["data"].get("dataset_config"), dataset_split=split,
                                       metric_type=metric, metric_value=round(float(value), 6),
                                       metric_name=f"{split.capitalize()} {METRIC_NAMES[metric].lower()}"))  # fmt: skip
    return rows


def model_card(output_dir: str | Path, export: str = "best", model_ref: str | None = None) -> str:
    """The card of `output_dir/export`, from the run's files (after the run has written results.json); its usage
    snippets load `model_ref` (the Hub repository it is pushed to; by default the folder's path)."""
    from huggingface_hub import ModelCard, ModelCardData

    out = Path(output_dir)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    results = _read_json(out / "results.json")
    serving = _read_json(out / export / "harness.json")
    exported = _read_json(out / export / "config.json")
    setup = (_rows(out, "setup") or [{}])[-1]
    fusion = (out / export / "fusion.json").is_file()
    task = results.get("task", "classification")
    base, base_meta = base_model(cfg["model"]["name_or_path"])
    dataset = _dataset(cfg)
    run_name = out.resolve().name
    tags = ["harness", PIPELINE_TAGS.get(task, "text-classification")]
    tags += [t for t in (exported.get("model_type"), cfg["task"]["problem_type"] if task == "classification" else None,
                         "multimodal" if fusion else None) if t]  # fmt: skip
    data = ModelCardData(
        library_name=None if fusion else "transformers",
        pipeline_tag=None if fusion else PIPELINE_TAGS.get(task),
        base_model=base,
        datasets=[dataset[0]] if dataset[0] else None,
        license=base_meta.get("license"),
        language=base_meta.get("language"),
        tags=tags,
        model_name=run_name,
        eval_results=_eval_results(run_name, task, dataset, results, cfg) or None,
    )
    ref = model_ref or f"{out.name}/{export}"
    body = _prose(
        cfg,
        results,
        serving,
        exported,
        setup,
        task,
        base,
        dataset,
        export,
        fusion,
        run_name,
        ref,
        model_ref is not None,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _scores_table(results: dict) -> str:
    splits = {"validation": (results.get("best") or {}).get("validation") or {}, "test": results.get("test") or {}}
    names = [m for m in METRIC_NAMES if any(isinstance(s.get(m), (int, float)) for s in splits.values())]
    if not names:
        return "No split with labels was evaluated.\n"
    lines = ["| split | examples | " + " | ".join(METRIC_NAMES[m] for m in names) + " |",
             "|---|--:|" + "--:|" * len(names)]  # fmt: skip
    for split, scores in splits.items():
        if scores:
            cells = [f"{scores[m]:.4f}" if isinstance(scores.get(m), (int, float)) else "-" for m in names]
            lines.append(f"| {split} | {scores.get('samples', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _reading(cfg: dict, serving: dict) -> str:
    data = serving or {**cfg["data"], **cfg["eval"]}
    truncation = data.get("truncation", "head")
    how = {"head": "its first tokens", "tail": "its last tokens",
           "head_tail": f"its first {data.get('head_tokens')} and last tokens"}[truncation]  # fmt: skip
    text = f"Texts are read as {data.get('max_length')} tokens at most (special tokens included), keeping {how}"
    if data.get("long_documents") == "windows":
        text += (f"; validation and test read long texts whole, in windows sharing {data.get('window_stride')} tokens, "
                 f"their logits pooled by {data.get('window_pooling')}")  # fmt: skip
    pair = data.get("text_pair_column")
    return text + (f". The model reads text pairs ({data.get('text_column')}, {pair})." if pair else ".")


def _prose(cfg: dict, results: dict, serving: dict, exported: dict, setup: dict, task: str, base: str | None,
           dataset: tuple[str | None, str], export: str, fusion: bool, run_name: str, ref: str,
           on_hub: bool) -> str:  # fmt: skip
    train, model = cfg["train"], cfg["model"]
    start = f"[{base}](https://huggingface.co/{base})" if base else f"`{model['name_or_path']}`"
    what = {"classification": f"{cfg['task']['problem_type'].replace('_', '-')} text classification",
            "masked-lm": "masked-language-model pre-training"}.get(task, task)  # fmt: skip
    labels = [exported.get("id2label", {})[k] for k in sorted(exported.get("id2label", {}), key=int)]
    best = results.get("best") or {}
    which = (
        "the best model by validation " + f"{best.get('metric')} (step {best.get('step')})"
        if export == "best"
        else "the model at the end of training"
    )
    world, sharding = results.get("world_size", setup.get("world_size", 1)), setup.get("sharding", "ddp")
    steps_text = (f"{results.get('optimizer_steps')} optimizer steps ({results.get('epochs_completed')} epochs) of "
                  f"{train['batch_size']} examples x {train['grad_accum']} accumulation x {world} processes")  # fmt: skip
    lines = [
        f"# {run_name}", "",
        f"{start} fine-tuned for {what} on {dataset[1]} with the harness "
        f"(`{'harness/pretrain.py' if task == 'masked-lm' else 'harness/train.py'}`). This folder is {which}.", "",
        *([f"Labels, in output order: {', '.join(f'`{name}`' for name in labels)}.", ""] if labels and task == "classification"
          and cfg["task"]["problem_type"] != "regression" else []),
        "## Results", "", _scores_table(results),
        "## Training", "",
        f"- {steps_text}; peak learning rate {train['lr']:g}, "
        + (f"{train['warmup_steps']} warmup steps" if train["warmup_steps"] else f"{train['warmup_ratio']:.0%} of the steps warming up")
        + f", then a {train['scheduler']} schedule; AdamW weight decay {train['weight_decay']:g}, gradient clipping at "
        f"{train['max_grad_norm']:g}"
        + (f", layer-wise learning-rate decay {train['layer_lr_decay']:g}" if train["layer_lr_decay"] != 1.0 else "") + ".",
        f"- Precision {results.get('precision', train['precision'])}"
        + (" with TF32 matmuls" if results.get("tf32") else "")
        + (", gradient checkpointing" if train.get("gradient_checkpointing") else "") + f"; seed {cfg['seed']}.",
        f"- {world} process{'es' if world != 1 else ''} ({sharding}) on {setup.get('device', '?')}; wall time "
        f"{results.get('wall_seconds', 0):.0f} s, training {results.get('train_samples_per_s', 0):.1f} samples/s"
        + (f" ({100 * results['train_mfu']:.1f}% MFU)" if "train_mfu" in results else "") + ".",
        f"- {_reading(cfg, serving)}", "",
        "## Use", "",
    ]  # fmt: skip
    lines += _usage(ref, on_hub, fusion, task, model.get("trust_remote_code", False))
    return "\n".join(lines) + "\n"


def _usage(ref: str, on_hub: bool, fusion: bool, task: str, remote_code: bool) -> list[str]:
    if fusion:
        return ["A multimodal model of the harness: transformers cannot load it. In Python:", "", "```python",
                "from harness.multimodal import load_fusion_classifier", "",
                f'model = load_fusion_classifier("{ref}")', "```"]  # fmt: skip
    trust = ", trust_remote_code=True" if remote_code else ""
    if task == "masked-lm":
        return ["```python", "from transformers import pipeline", "",
                f'fill = pipeline("fill-mask", model="{ref}"{trust})', "```"]  # fmt: skip
    flag = " --trust-remote-code" if remote_code else ""
    folder = ref.rsplit("/", 1)[-1] if on_hub else ref
    fetch = [f"    hf download {ref} --local-dir {folder}"] if on_hub else []
    return ["```python", "from transformers import pipeline", "",
            f'classify = pipeline("text-classification", model="{ref}"{trust})',
            'classify("A wonderful film.")', "```", "",
            "With the harness, texts are read exactly as in training (the folder's `harness.json`):", "",
            *fetch, f'    python -m harness.predict --model {folder}{flag} "A wonderful film."']  # fmt: skip


def write_model_cards(output_dir: str | Path) -> list[Path]:
    """README.md into each export of a finished run (best/, final/ where present); returns the files written."""
    out = Path(output_dir)
    written = []
    for export in ("best", "final"):
        if (out / export / "config.json").is_file():
            path = out / export / CARD_FILE
            path.write_text(model_card(out, export))
            written.append(path)
    return written
