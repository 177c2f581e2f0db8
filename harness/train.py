"""Fine-tune a text classifier.

accelerate launch harness/train.py --config configs/quickstart.yaml [key=value ...]
python harness/train.py --config configs/quickstart.yaml --print-config
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, Python puts harness/ itself on sys.path, where our module names (config, data,
    # distributed, ...) could shadow installed packages: import the package from the project root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from harness.cli import main_entry  # noqa: E402
from harness.config import ExperimentConfig  # noqa: E402


def run(cfg: ExperimentConfig) -> dict:
    from harness.loop import run as fine_tune  # torch, transformers: imported once the config is valid

    return fine_tune(cfg)


def main(argv: list[str] | None = None) -> int:
    return main_entry(run, argv, prog="harness/train.py")


if __name__ == "__main__":
    sys.exit(main())
