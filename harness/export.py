"""Export a model folder (a run's `best/` or `final/`, or any Hugging Face classifier of the families the harness
trains) to ONNX, for serving with onnxruntime:

    python -m harness.export runs/imdb/best --onnx runs/imdb/onnx
    python -m harness.predict --model runs/imdb/onnx --backend onnx "a wonderful film"

The folder written holds `model.onnx` (inputs `input_ids`, `attention_mask` and, where the model embeds them,
`token_type_ids`, all [batch, sequence] int64 with both axes dynamic; output `logits`, float32), the tokenizer, the
model's config.json (labels, problem type) and the export's `harness.json`, so that harness.predict reads text
exactly as the run did (truncation, pairs, windows). The export runs the model once under PyTorch and once under
onnxruntime on the same batch and stops (exit 1) if their logits differ by more than `TOLERANCE`.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
from pathlib import Path

from harness.cli import EXIT_BAD_INPUT

ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOLERANCE = 1e-4
"""Largest difference between PyTorch's and onnxruntime's logits the export accepts (fp32)."""
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportError(ValueError):
    """The folder cannot be exported as asked; the message says why."""


def require_onnx() -> None:
    import importlib.util

    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"ONNX needs {', '.join(missing)}: pip install 'harness[onnx]' (onnx, onnxruntime, onnxscript)"
        )


def model_inputs_of(model) -> list[str]:
    """The inputs of `INPUTS` the model's forward takes."""
    taken = inspect.signature(model.forward).parameters
    return [name for name in INPUTS if name in taken]


def export_onnx(model_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> float:
    """Write the ONNX folder; returns the largest logit difference between PyTorch and onnxruntime found."""
    import warnings

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from harness.model import FUSION_FILE
    from harness.predict import check_model_dir
    from harness.serving import SERVING_FILE

    source, out = check_model_dir(model_dir), Path(out_dir)
    if (source / FUSION_FILE).is_file():
        raise ExportError(f"{source}: a multimodal model (its {FUSION_FILE}) takes inputs besides text; ONNX export "
                          "covers text classifiers")  # fmt: skip
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--onnx {out}: exists and is not empty; choose a new folder")
    require_onnx()
    # Eager attention: plain matmuls and softmax, which every ONNX runtime runs (the same function as SDPA's).
    model = AutoModelForSequenceClassification.from_pretrained(source, attn_implementation="eager",
                                                               trust_remote_code=trust_remote_code).eval()  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    names = model_inputs_of(model)
    sample = tokenizer(["an example review, long enough to have a few tokens in it", "short"], padding=True,
                       return_tensors="pt")  # fmt: skip
    example = {name: sample[name] if name in sample else torch.zeros_like(sample["input_ids"]) for name in names}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on ops it does not meet here (torchvision's)
            torch.onnx.export(logits_module(model, names), (), str(out / ONNX_FILE), kwargs=example, input_names=names,
                              output_names=["logits"], dynamo=True, verbose=False,
                              dynamic_shapes={name: {0: batch, 1: sequence} for name in names})  # fmt: skip
        tokenizer.save_pretrained(out)
        model.config.save_pretrained(out)
        if (source / SERVING_FILE).is_file():
            shutil.copy2(source / SERVING_FILE, out / SERVING_FILE)
        # Checked on another batch shape than the one traced: the axes are dynamic.
        check = tokenizer(["a third text, of another length than the two above", "and a fourth", "fifth"],
                          padding=True, return_tensors="pt")  # fmt: skip
        inputs = {name: check[name] if name in check else torch.zeros_like(check["input_ids"]) for name in names}
        with torch.inference_mode():
            expected = model(**inputs).logits.numpy()
        got = OnnxClassifier(out)(**inputs).logits.numpy()
        difference = float(np.max(np.abs(expected - got)))
    except Exception:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written is left behind
        raise
    if difference > TOLERANCE:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"onnxruntime's logits differ from PyTorch's by {difference:.3g} (> {TOLERANCE})")
    return difference


def logits_module(model, names: list[str]):
    """The classifier as a module taking its input tensors by name and returning the logits alone (what the
    exporter traces)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{name: given[name] for name in names}).logits

    return LogitsOnly()


class OnnxClassifier:
    """An exported classifier run by onnxruntime on the CPU, with the interface harness.predict uses from a
    transformers model: `config`, `device`, and a call on input tensors returning `.logits`."""

    def __init__(self, folder: str | Path):
        import onnxruntime
        import torch
        from transformers import AutoConfig

        folder = Path(folder)
        self.session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config = AutoConfig.from_pretrained(folder)
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        import numpy as np
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutput

        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)}  # fmt: skip
        feed = {name: given[name].cpu().numpy().astype(np.int64) for name in self.inputs}
        (logits,) = self.session.run(["logits"], feed)
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))

    __call__ = forward

    def eval(self) -> OnnxClassifier:
        return self


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run's best/ or final/, or a Hugging Face classifier folder")
    parser.add_argument("--onnx", required=True, metavar="FOLDER", help="the ONNX folder to write (new or empty)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the code the model folder ships")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from harness.predict import PredictError

    args = parse_args(argv)
    try:
        difference = export_onnx(args.model, args.onnx, args.trust_remote_code)
    except (ExportError, PredictError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"{Path(args.onnx) / ONNX_FILE}: logits within {difference:.2g} of PyTorch's; serve it with "
          f"python -m harness.predict --model {args.onnx} --backend onnx", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
