"""The side-by-side benchmark's smoke mode: every side runs, the table and its JSON hold finite numbers.

No timing assertions: benchmark figures are recorded in benchmarks/RESULTS.md, never asserted by tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import IMDB_DIR, ROOT

BENCH = ROOT / "benchmarks" / "vs_trainer.py"
SIDES = ("harness", "trainer-best", "trainer-default")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The report's Markdown table rows, keyed by side."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 10 and cells[1] in SIDES:
            rows[cells[1]] = cells
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%x"))


@pytest.mark.slow
def test_smoke_mode_runs_all_three_sides_on_identical_work(tmp_path):
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--precision", "bf16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    rows = table_rows(proc.stdout)
    assert sorted(rows) == sorted(SIDES), proc.stdout[-3000:]
    for side, cells in rows.items():
        values = [number(c) for c in cells[2:]]  # train s ... harness ratio
        assert all(math.isfinite(v) for v in values), (side, cells)
        train_s, samples_s, tokens_s, padding, mfu, memory, accuracy, ratio = values
        assert train_s > 0 and samples_s > 0 and tokens_s > samples_s and memory > 0, (side, cells)
        assert 0 <= padding < 100 and 0 < mfu and 0 <= accuracy <= 1 and ratio > 0, (side, cells)
    assert number(rows["harness"][9]) == pytest.approx(1.0)
    assert out.read_text().strip() in proc.stdout

    data = json.loads(out.with_name(out.name + ".json").read_text())
    (workload,) = data["workloads"]
    runs = {row["side"]: row["runs"][0] for row in data["rows"]}
    # Identical work: every side trained the same number of examples and steps, and the Trainer sides saw the
    # token ids the harness's pipeline produced (the benchmark itself fails otherwise).
    assert {r["train_examples"] for r in runs.values()} == {workload["train_examples"]}
    assert len({r["optimizer_steps"] for r in runs.values()}) == 1
    assert {runs[s]["data_sha256"] for s in SIDES[1:]} == {workload["data_sha256"]}
    assert {r["test_samples"] for r in runs.values()} == {workload["test_examples"]}
    # Every side counts the same real tokens; padded to max_length, the default Trainer pads the most.
    assert {round(r["real_tokens"]) for r in runs.values()} == {workload["real_train_tokens"]}
    assert runs["trainer-default"]["padded_tokens"] >= runs["trainer-best"]["padded_tokens"]
    assert runs["trainer-default"]["extra"]["mixed_precision"] == "bf16"


def test_cuda_mode_fails_clearly_without_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA mode would run for real")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cuda"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--device cuda needs a CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr


def test_cuda_workloads_are_bert_base_throughput_and_minilm_time_to_accuracy():
    from benchmarks.vs_trainer import parse_args
    from benchmarks.workloads import build_workloads

    bert, minilm = build_workloads(parse_args(["--device", "cuda"]).work)
    assert bert.random_bert and bert.config.name == "imdb_bert_base.yaml"
    assert {"data.max_length=512", "train.precision=bf16", "data.max_train_samples=null"} <= set(bert.overrides)
    assert all("train.layer_lr_decay=1.0" in w.overrides for w in (bert, minilm))  # as the Trainer sides train
    assert not minilm.random_bert and minilm.config.name == "imdb_minilm_cpu.yaml"
    assert {"data.max_train_samples=null", "data.max_eval_samples=null"} <= set(minilm.overrides)


@pytest.mark.skipif(not IMDB_DIR.is_dir(), reason=f"real IMDB data not found at {IMDB_DIR}")
def test_tokenization_benchmark_runs_on_a_slice_of_imdb():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tokenize_imdb.py"), "--limit", "200", "--data", str(IMDB_DIR)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (line.strip().strip("|") for line in proc.stdout.splitlines() if line.startswith("| "))
    rows = {cells[0]: cells for cells in ([cell.strip() for cell in line.split("|")] for line in lines)}
    sides = ("harness cold", "harness cached", "datasets.map baseline")
    assert set(sides) <= set(rows), proc.stdout
    assert all(float(rows[side][1]) > 0 for side in sides)
    assert "400 reviews (train 200, test 200)" in proc.stdout


def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch):
    from benchmarks.vs_trainer import parse_args
    from harness import distributed

    for native, cpu_precision in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(distributed, "native_cpu_bf16", lambda native=native: native)
        assert parse_args([]).work.precision == cpu_precision
        assert parse_args(["--device", "cuda"]).work.precision == "bf16"
        assert parse_args(["--precision", "bf16"]).work.precision == "bf16"


def test_cpu_step_benchmark_prints_both_variants_under_both_allocator_settings():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_step.py"), "--steps", "1", "--length", "16", "--batch", "2",
         "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines() if "| glibc" in line
            or "| runtime" in line]  # fmt: skip
    assert [(r[0], r[1].split()[0]) for r in rows] == [
        ("glibc defaults", "torch's"), ("glibc defaults", "harness"),
        ("runtime.keep_freed_cpu_memory", "torch's"), ("runtime.keep_freed_cpu_memory", "harness"),
    ]  # fmt: skip
    assert all(number(r[2]) > 0 and number(r[3]) > 0 for r in rows) and rows[0][4] == "1.00x"


GPU_CHECK_ROWS = ["throughput-bf16", "throughput-fp16", "vs-trainer", "exact-resume", "zero2", "zero3", "fsdp2",
                  "host-syncs-bf16", "host-syncs-fp16", "fp16-overflow", "sdpa-kernels"]  # fmt: skip


@pytest.mark.slow
def test_gpu_check_smoke_passes_on_cpu(tmp_path):
    pytest.importorskip("deepspeed", reason="the ZeRO rows need the deepspeed package")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        # vs-trainer is vs_trainer.py's smoke, which test_smoke_mode_runs_all_three_sides_on_identical_work runs already.
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--skip", "vs-trainer", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert [row["name"] for row in report["rows"]] == GPU_CHECK_ROWS and report["passed"] and report["smoke"]
    # What needs CUDA is n/a on a CPU; everything else ran and passed.
    cuda_only = {"throughput-fp16", "host-syncs-bf16", "host-syncs-fp16"}
    assert {name for name, row in rows.items() if row["status"] == "n/a"} == cuda_only
    assert rows["vs-trainer"]["status"] == "skipped"
    assert all(rows[name]["status"] == "pass" for name in rows if name not in cuda_only | {"vs-trainer"})
    assert f"| {GPU_CHECK_ROWS[0]} | pass |" in proc.stdout

    throughput = rows["throughput-bf16"]["figures"]
    assert throughput["samples/s"] > 0 and throughput["real tokens/s"] > throughput["samples/s"]
    assert 0 < throughput["MFU vs measured"] and throughput["steps"] == 12 and throughput["skipped"] == 0
    # On a CPU a resumed run is the uninterrupted one, bit for bit; so are two uninterrupted runs.
    resume = rows["exact-resume"]["figures"]
    assert resume["max weight diff resumed"] == 0 == resume["max weight diff run-to-run"]
    assert resume["resumed from step"] in (6, 12) and resume["losses after resume equal"]
    for name in ("zero2", "zero3", "fsdp2"):
        sharded = rows[name]["figures"]
        assert sharded["world size"] == 1 and sharded["steps"] == 8
        assert sharded["max loss rel. diff"] <= sharded["allowed"] and sharded["samples/s"] > 0
        assert sharded["sharding"] == name  # under DeepSpeed / FSDP2, not a plain run that matches trivially
    overflow = rows["fp16-overflow"]["figures"]
    assert overflow["skipped at"] == [3, 4] == overflow["injected at"] and overflow["steps"] == 8
    # The sync counting ran its plumbing: one count per step, none on a CPU.
    assert rows["host-syncs-bf16"]["figures"]["per plain step (max)"] == 0
    kernels = rows["sdpa-kernels"]["figures"]
    assert kernels["attention"] == "sdpa" and not any(str(v).startswith("no SDPA") for v in kernels.values())
