"""Continue masked-language-model pre-training of an encoder on in-domain text, then fine-tune from it.

accelerate launch harness/pretrain.py --config configs/pretrain_imdb.yaml [key=value ...]
accelerate launch harness/train.py --config configs/imdb_minilm_cpu.yaml model.name_or_path=runs/pretrain_imdb/best

The corpus is the train texts plus the unlabelled split (never the test texts); whole-word masking; the same
precision, accumulation, clipping, ZeRO, checkpoint, resume and logging as fine-tuning (harness/loop.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # see harness/train.py

from harness.cli import main_entry  # noqa: E402
from harness.config import PretrainConfig  # noqa: E402


def run(cfg: PretrainConfig) -> dict:
    from harness.loop import run as train  # torch, transformers: imported once the config is valid
    from harness.tasks.masked_lm import MaskedLMTask

    return train(cfg, MaskedLMTask(cfg))


def main(argv: list[str] | None = None) -> int:
    return main_entry(run, argv, prog="harness/pretrain.py", config_class=PretrainConfig)


if __name__ == "__main__":
    sys.exit(main())
