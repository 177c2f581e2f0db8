"""Each rank's memory through setup on real IMDB: peak and resident set (VmHWM, VmRSS) and private memory (USS)
of every rank once setup is done, just before the first training step, with a cold and then a warm tokenization
cache.

    python -m benchmarks.setup_memory --data ../shared/data/imdb [--nproc 2] [--model builtin:all-minilm-l6-v2]

It starts `torchrun --nproc_per_node N harness/train.py` on the full splits (25,000 train, 25,000 test reviews;
max_length 512), stops each rank before its first step (HARNESS_INJECT_PAUSE), reads /proc, and kills the run.
Linux only."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def kib(status: str, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def measure(data: str, model: str, nproc: int, cache: Path, out: Path, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29600 + os.getpid() % 1000), "harness/train.py", "--config", "configs/imdb_minilm_cpu.yaml",
           f"data.path={data}", f"model.name_or_path={model}", "data.max_train_samples=null",
           "data.max_eval_samples=null", "data.max_length=512", f"data.cache_dir={cache}", f"output_dir={out}",
           "overwrite=true", "logging.progress=plain", *overrides]  # fmt: skip
    env = {**os.environ, "HARNESS_INJECT_PAUSE": "train:600", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    paused, lines = 0, []
    for line in job.stderr:
        lines.append(line)
        paused += "pausing 600 s in train" in line
        if paused == nproc:
            break
    seconds = time.monotonic() - started
    if paused < nproc:
        raise SystemExit(f"the run ended before its setup finished:\n{''.join(lines[-30:])}")
    workers = [p for p in psutil.Process(job.pid).children(recursive=True) if "RANK" in p.environ()]
    rows = []
    for worker in sorted(workers, key=lambda p: int(p.environ()["RANK"])):
        status = Path(f"/proc/{worker.pid}/status").read_text()
        rows.append({"rank": int(worker.environ()["RANK"]), "peak_mib": kib(status, "VmHWM") / 1024,
                     "rss_mib": kib(status, "VmRSS") / 1024, "uss_mib": worker.memory_full_info().uss / 2**20,
                     "setup_s": seconds})  # fmt: skip
    job.send_signal(signal.SIGKILL)
    for worker in workers:
        worker.kill()
    job.wait()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imdb"))
    parser.add_argument("--model", default="builtin:all-minilm-l6-v2")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="more key=value overrides of the run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="setup-memory-") as tmp:
        print(f"{'cache':<6} {'rank':>4} {'peak RSS MiB':>13} {'RSS MiB':>8} {'USS MiB':>8} {'setup s':>8}")
        for cache_state in ("cold", "warm"):
            for row in measure(
                args.data, args.model, args.nproc, Path(tmp) / "cache", Path(tmp) / "run", args.overrides
            ):
                print(f"{cache_state:<6} {row['rank']:>4} {row['peak_mib']:>13.0f} {row['rss_mib']:>8.0f} "
                      f"{row['uss_mib']:>8.0f} {row['setup_s']:>8.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
