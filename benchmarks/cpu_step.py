"""One MiniLM training step on CPU: torch's dropout and SDPA against the harness's fast CPU dropout, side by side.

The two variants are swapped between steps of one process on the same inputs (interleaved, so a shared
machine's drift hits both alike), and the table shows each one's median step time. The allocator setting
(`runtime.keep_freed_cpu_memory`, glibc's mallopt) is per process: `--allocator both` (the default) runs a
child process per setting.

What one step is: MiniLM (`builtin:all-minilm-l6-v2`, dropout 0.1 on hidden states and attention) in fp32,
`--batch` sequences of random token ids whose lengths spread over the last 40 tokens below `--length` (with
their padding mask), cross-entropy, backward, gradient clipping at 1.0, fused AdamW.

Usage (from the repository root):

    python benchmarks/cpu_step.py                      # 16 x up to 208 tokens, 8 steps per variant
    python benchmarks/cpu_step.py --length 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import the harness from the project root

VARIANTS = ("torch", "harness")
LABELS = {"torch": "torch's dropout and SDPA", "harness": "harness fast CPU dropout (train.fast_cpu_dropout)"}


def measure(opts) -> dict[str, list[float]]:
    """Seconds per step of each variant, interleaved, in this process."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from harness.config import ModelConfig
    from harness.cpu_dropout import ATTENTION_NAME, use_fast_cpu_dropout
    from harness.distributed import keep_freed_cpu_memory, set_cpu_threads
    from harness.model import load_model, parameter_groups

    if opts.allocator == "keep":
        keep_freed_cpu_memory()
    set_cpu_threads(opts.threads)
    _, model = load_model(ModelConfig(name_or_path="builtin:all-minilm-l6-v2"), "classifier", ["neg", "pos"], 0)
    use_fast_cpu_dropout(model)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]  # CpuDropout now
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01, lr=1e-5), lr=1e-5, fused=True)
    model.train()

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (opts.batch, opts.length), generator=generator)
    lengths = torch.randint(max(2, opts.length - 40), opts.length + 1, (opts.batch,), generator=generator)
    lengths[0] = opts.length
    mask = (torch.arange(opts.length)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 2, (opts.batch,), generator=generator)

    def use(variant: str) -> None:
        fast = variant == "harness"
        model.set_attn_implementation(ATTENTION_NAME if fast else "sdpa")
        for module in dropouts:  # the swapped modules' class is CpuDropout; torch's forward on demand
            module.forward = type(module).forward.__get__(module) if fast else nn.Dropout.forward.__get__(module)

    def step() -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS:  # warm-up: allocations, kernel selection
        use(variant)
        step()
    for _ in range(opts.steps):
        for variant in VARIANTS:
            use(variant)
            seconds[variant].append(step())
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=208, help="longest sequence (tokens)")
    p.add_argument("--steps", type=int, default=8, help="steps per variant (after one warm-up step each)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--allocator", choices=["both", "keep", "default"], default="both",
                   help="glibc setting: keep (runtime.keep_freed_cpu_memory), default, or both in child processes")  # fmt: skip
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child mode: raw seconds as JSON
    opts = p.parse_args(argv)
    if opts.batch < 1 or opts.length < 2 or opts.steps < 1:
        p.error("--batch, --length and --steps must be positive (--length at least 2)")

    if opts.json:
        print(json.dumps(measure(opts)))
        return 0
    settings = ["default", "keep"] if opts.allocator == "both" else [opts.allocator]
    rows = []
    for setting in settings:
        cmd = [sys.executable, __file__, f"--batch={opts.batch}", f"--length={opts.length}", f"--steps={opts.steps}",
               f"--threads={opts.threads}", f"--allocator={setting}", "--json"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        seconds = json.loads(out.stdout.strip().splitlines()[-1])
        for variant in VARIANTS:
            rows.append((setting, variant, statistics.median(seconds[variant])))
    baseline = rows[0][2]  # torch's variant under the first allocator setting
    print(
        f"MiniLM training step, fp32, {opts.batch} x up to {opts.length} tokens; median of {opts.steps} "
        "interleaved steps per variant"
    )
    print()
    print("| allocator | variant | ms per step | samples/s | speed-up over the first row |")
    print("|---|---|--:|--:|--:|")
    for setting, variant, median in rows:
        allocator = "runtime.keep_freed_cpu_memory" if setting == "keep" else "glibc defaults"
        print(
            f"| {allocator} | {LABELS[variant]} | {median * 1000:,.0f} | {opts.batch / median:.2f} | "
            f"{baseline / median:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
