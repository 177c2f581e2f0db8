"""The one place that knows about launchers, backends, devices and world size.

Everything else talks to the returned `Accelerator`. The same code serves `python harness/train.py` (one
process), `torchrun --nproc_per_node N` and `accelerate launch` on CPU (gloo) or GPUs (NCCL).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    patch_environment,
    set_seed,
)

from harness.config import ConfigError, ExperimentConfig
from harness.fsdp import FSDPSettings
from harness.fsdp import memory as fsdp_memory
from harness.fsdp import micro_batch as fsdp_micro_batch
from harness.rundir import TRACKER_DIR
from harness.tracking import check_trackers

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
FLAGS_SOURCE = "the accelerate launch DeepSpeed flags"


def launched_world_size() -> int:
    """Processes the launcher started (torchrun and accelerate launch both export WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_requested() -> bool:
    """`accelerate launch --use_deepspeed` or a DEEPSPEED accelerate config sets this."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerate_launch_env(launch_args: list[str], num_processes: int) -> dict[str, str]:
    """What `accelerate launch <launch_args> --num_processes N` exports to its workers for a DeepSpeed or FSDP
    launch (an accelerate config file or the --use_deepspeed / --use_fsdp flags), computed by Accelerate's own
    launcher code: the ACCELERATE_* and FSDP_* variables, not those torchrun adds per rank. For processes started
    another way that must run as if launched (the test suite's and gpu_check --smoke's forked runs). Unlike
    `accelerate launch`, a user's default config (`accelerate config`) is not read: what these processes run must
    not depend on the machine's user."""
    from accelerate.commands import launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parsed = launch.launch_command_parser().parse_args([*launch_args, "--num_processes", str(num_processes), "x.py"])
    user_default, launch.default_config_file = launch.default_config_file, os.devnull + ".absent"
    try:
        args, defaults, mixed_precision_from_config = launch._validate_launch_command(parsed)
    finally:
        launch.default_config_file = user_default
    if args.use_deepspeed:
        # What accelerate's launch_command sets before its deepspeed_launcher.
        fields = [
            *(defaults.deepspeed_config if defaults else {}),
            *(["mixed_precision"] if mixed_precision_from_config else []),
        ]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        raise ValueError(f"accelerate launch {' '.join(launch_args)}: neither a DeepSpeed nor an FSDP launch")
    return {key: value for key, value in env.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def fill_deepspeed_config(raw: dict, cfg: ExperimentConfig, world_size: int, source: str, precision: str) -> dict:
    """Fill every value the experiment owns into a DeepSpeed config; a value set in both that disagrees is an
    error naming both. Missing keys and "auto" are filled; keys the experiment does not own are kept.
    `precision` is train.precision resolved (auto is bf16, fp16 or fp32 by then)."""
    t = cfg.train
    owned: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (t.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "train_batch_size": (
            t.batch_size * t.grad_accum * world_size,
            "train.batch_size x train.grad_accum x world size",
        ),
        "gradient_clipping": (t.max_grad_norm, "train.max_grad_norm"),
        "bf16.enabled": (precision == "bf16", "train.precision"),
        "fp16.enabled": (precision == "fp16", "train.precision"),
    }
    if "optimizer" in raw:  # DeepSpeed builds the optimizer itself (e.g. its CPU Adam under offload)
        owned.update({
            "optimizer.params.lr": (t.lr, "train.lr"),
            "optimizer.params.betas": ([t.adam_beta1, t.adam_beta2], "train.adam_beta1/adam_beta2"),
            "optimizer.params.eps": (t.adam_eps, "train.adam_eps"),
            "optimizer.params.weight_decay": (t.weight_decay, "train.weight_decay"),
        })  # fmt: skip
    problems = []
    if "scheduler" in raw:
        problems.append(
            f"{source}: has a scheduler block, but the harness schedules the learning rate "
            "(train.scheduler, train.warmup_ratio / warmup_steps); remove the block"
        )
    filled = copy.deepcopy(raw)
    for key, (value, exp_key) in owned.items():
        current = _get(filled, key)
        if current is None or current == "auto":
            _set(filled, key, value)
        elif current != value and not (
            isinstance(value, float) and isinstance(current, (int, float)) and float(current) == value
        ):
            problems.append(
                f'{source}: {key} is {current!r} but the experiment\'s {exp_key} is {value!r}; set it to "auto" or make them agree'
            )
    if problems:
        raise ConfigError(problems, "DeepSpeed config")
    filled.setdefault("steps_per_print", 10**9)  # the harness logs progress itself
    if precision == "bf16":
        # Gradients are reduced and accumulated in fp32, as DDP's are (DeepSpeed's defaults would use bf16,
        # whose 8-bit mantissa loses small gradients in sums over ranks and micro-batches); a config may say otherwise.
        filled.setdefault("communication_data_type", "fp32")
        filled.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return filled


def build_deepspeed_plugin(cfg: ExperimentConfig, world_size: int, precision: str):
    """DeepSpeed settings from the JSON named by the launch (or from the launch flags), completed from the
    experiment config: one source of truth for batch size, accumulation, clipping and precision."""
    from accelerate.utils import DeepSpeedPlugin

    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        path = Path(config_file)
        try:
            raw, source = json.loads(path.read_text()), str(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError([f"{path}: cannot read the DeepSpeed config: {exc}"], "DeepSpeed config") from exc
    else:
        # Flags only (--use_deepspeed --zero_stage N ...): Accelerate builds the dict from its environment;
        # values given as flags count as set, the rest are "auto".
        raw, source = copy.deepcopy(DeepSpeedPlugin().deepspeed_config), FLAGS_SOURCE
        raw.pop("steps_per_print", None)
    filled = fill_deepspeed_config(raw, cfg, world_size, source, precision)
    # zero3_init_flag off: models here fit one device, and ZeRO-3 partitions them at engine creation
    # (transformers is told so once the Accelerator exists: load_models_whole).
    return DeepSpeedPlugin(hf_ds_config=filled, zero3_init_flag=False)


def load_models_whole() -> None:
    """Make transformers build and load models whole on every rank under ZeRO-3, as the plugin's
    zero3_init_flag=False says.

    Accelerate registers its DeepSpeed config with transformers (`HfDeepSpeedConfig`) whatever that flag is, and
    transformers then loads every `from_pretrained` checkpoint inside `deepspeed.zero.Init`: each parameter is
    partitioned as it is created, an empty placeholder on every rank before `prepare`. Everything that reads the
    model before the engine exists would see empty tensors: the optimizer groups (no matrix would get weight
    decay), the FLOP count (MFU near 0), a regression head's standardisation, and the new head's seeded
    initialisation (drawn per partition, so it would differ with the world size). The engine partitions the
    whole model at `prepare` instead; encoders fit one device's memory whole."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, and within a SLURM job no more than the job's CPUs on
    this node (a cluster without task affinity, TaskPlugin=task/none, leaves every process the whole node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    allocated = os.environ.get("SLURM_CPUS_ON_NODE", "").strip()
    return min(cores, int(allocated)) if allocated.isdigit() and int(allocated) > 0 else cores


def wait_for_everyone_untimed(accelerator: Accelerator, what: str, report_every_s: float = 60.0) -> None:
    """A barrier with no time limit, for setup work whose length varies by rank (tokenizing on a node whose cache
    is cold while another node's is warm): through the process group's store, polled, never a collective bounded
    by runtime.collective_timeout_s. Says every `report_every_s` seconds how many ranks are still on `what`."""
    if accelerator.num_processes == 1:
        return
    store = torch.distributed.distributed_c10d._get_default_store()
    key = f"harness/done/{what}"
    store.add(key, 1)
    started = reported = time.monotonic()
    while (arrived := store.add(key, 0)) < accelerator.num_processes:
        now = time.monotonic()
        if accelerator.is_main_process and now - reported >= report_every_s:
            print(f"waiting {now - started:.0f} s for {accelerator.num_processes - arrived} rank(s) still on {what}",
                  file=sys.stderr, flush=True)  # fmt: skip
            reported = now
        time.sleep(0.05)


def set_cpu_threads(requested: int) -> int:
    """Threads for CPU math. `accelerate launch` exports OMP_NUM_THREADS=1 even for a single process, and
    torchrun does for every process, which leaves cores idle; 0 means: the cores this process may use divided
    by the processes on this node."""
    if requested == 0:
        requested = max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(requested)
    return requested


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4


def keep_freed_cpu_memory() -> bool:
    """Serve every tensor from the heap and keep freed memory for the next step (glibc only; False elsewhere).

    PyTorch's CPU allocator is plain malloc, and glibc hands each block over 32 MiB (at most; less before its
    threshold adapts) straight back to the kernel on free. Training on CPU allocates such blocks many times per
    step (a 16 x 12 x 256 x 256 attention tensor is 48 MiB), so each one is mapped afresh and page-faulted in,
    zeroed, 4 KiB at a time: measured on MiniLM (2-core CPU, lengths up to 256), that was a fifth of the step.
    With mmap off and trimming effectively off, freed blocks are reused instead; the process keeps its peak
    footprint until it exits (threads' arenas still fall back to mmap for blocks their heaps cannot hold).

    Called once setup is done (`setup` in harness/loop.py), after `release_setup_memory`: otherwise every rank
    would keep its setup's peak (the raw texts) for the whole run."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and macOS have other mallopt meanings)
    except (OSError, AttributeError):
        return False
    return all(
        libc.mallopt(param, value) == 1
        for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 * 2**20))
    )


def release_setup_memory() -> None:
    """Give back what reading and tokenizing the data freed (the raw texts are freed as their last reference
    goes): Arrow's memory pool (jemalloc or mimalloc keep freed pages for reuse) and glibc's free heap
    (malloc_trim). What stays is the model, the optimizer and the token ids, which are views into the
    memory-mapped tokenization cache."""
    import ctypes
    import ctypes.util

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (what oneDNN checks: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_gpu_bf16() -> bool:
    """Whether this rank's GPU computes bf16 natively (compute capability 8.0 and newer: Ampere, Hopper, ...).

    Read from the device's properties, which creates no CUDA context: `torch.cuda.is_bf16_supported()` asks the
    current device (cuda:0 in every rank, before each selects its own) and by default counts emulation, which
    V100 and T4 have, by allocating a tensor there."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    major, _ = torch.cuda.get_device_capability(local_rank % max(1, torch.cuda.device_count()))
    return major >= 8


def resolve_precision(requested: str, on_gpu: bool) -> str:
    """train.precision `auto`: bf16 on GPUs that compute it natively (Ampere and newer; fp16 with loss scaling on
    older ones), bf16 on CPUs that compute it natively, fp32 elsewhere. Other values are taken as they are."""
    if requested != "auto":
        return requested
    if on_gpu:
        return "bf16" if native_gpu_bf16() else "fp16"
    return "bf16" if native_cpu_bf16() else "fp32"


def precision_warning(device: torch.device, precision: str) -> str | None:
    """A warning when the precision asked for is much slower than fp32 on this device, else None.

    CPUs without native bf16 (no AVX512-BF16 or AMX: every AVX2-only CPU) run bf16 matmuls through emulation,
    many times slower than fp32 (figures in README, Speed on CPU). Training still runs."""
    if device.type != "cpu" or precision != "bf16" or native_cpu_bf16():
        return None
    return ("train.precision=bf16 on a CPU without native bf16 instructions (AVX512-BF16 / AMX): matmuls are "
            "emulated and training runs many times slower than in fp32; set train.precision=fp32 (or auto)")  # fmt: skip


def offloads_to_cpu(plugin) -> bool:
    """Whether a DeepSpeed config keeps optimizer state (or parameters) in CPU memory: its optimizer steps run
    on the CPU, in torch threads."""
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return any((zero.get(key) or {}).get("device") in ("cpu", "nvme") for key in ("offload_optimizer", "offload_param"))


def join_process_group(backend: str, timeout: timedelta) -> None:
    """Form the default process group ourselves under torchrun (and accelerate launch, torchrun underneath), on
    a store whose keys carry the restart attempt.

    After a crashed worker, `torchrun --max-restarts N` restarts every worker against the same rendezvous store,
    whose keys from the failed attempt (each rank's gloo / NCCL address) are still there: the new ranks read
    their predecessors' addresses and the new group never forms (seen: "Gloo connectFullMesh failed ...
    timed out connecting", the peer's address from the dead attempt). Prefixing every key with
    TORCHELASTIC_RESTART_COUNT gives each attempt a clean namespace in the same store. Accelerate then finds the
    group formed and uses it."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or launched_world_size() == 1 or torch.distributed.is_initialized():
        return
    # torch's own env:// rendezvous: the agent's store where torchrun hosts one, else rank 0's.
    store, rank, world_size = next(torch.distributed.rendezvous("env://", timeout=timeout))
    store = torch.distributed.PrefixStore(f"harness/attempt-{restart}/", store)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def use_tf32(enabled: bool) -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa, tensor cores: several times faster on
    A100/H100; bf16/fp16 runs are not affected), as train.tf32 says."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def use_this_pythons_ninja() -> None:
    """Put this interpreter's bin folder first on PATH when its `ninja` is not the one found there (a
    virtualenv run without activating it). DeepSpeed JIT-builds its ops (on CPU, the shared-memory allreduce) with
    the first ninja on PATH, and ninja 1.11 (Debian's) and 1.13 (the pip package DeepSpeed installs) hash build
    commands differently: runs that alternate between the two rebuild the op each time, about 30 s on 2 cores."""
    own = Path(sys.executable).parent / "ninja"
    if own.is_file() and shutil.which("ninja") != str(own):
        os.environ["PATH"] = f"{own.parent}{os.pathsep}{os.environ.get('PATH', '')}"


def build_deepspeed_cpu_ops() -> None:
    """Build DeepSpeed's shared-memory allreduce op for CPU runs now (about 30 s on 2 cores, once per virtualenv)
    instead of inside the first ZeRO run on CPU: `make test` does, after installing DeepSpeed. No-op with a GPU."""
    if torch.cuda.is_available():
        return
    use_this_pythons_ninja()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load()


def build_accelerator(cfg: ExperimentConfig) -> tuple[Accelerator, RunPlace]:
    """The run's Accelerator and its place (world, rank, device, precision, ZeRO stage, device-dependent
    choices), decided here once and passed down."""
    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.precision, on_gpu)
    if not on_gpu:
        set_cpu_threads(cfg.runtime.cpu_threads)
        # DeepSpeed (imported by Accelerate on some paths) probes for accelerators and warns "Setting accelerator
        # to CPU ... unable to detect it" in every process when none is found; on a CPU run that is the answer.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        use_tf32(cfg.train.tf32)
    if precision == "fp16" and not on_gpu:
        raise ConfigError(["train.precision: fp16 needs a CUDA GPU (loss scaling); use bf16, fp32 or auto on CPU"])
    fsdp = FSDPSettings.from_env(os.environ, cfg.train.gradient_checkpointing)
    if fsdp is not None:
        check_fsdp_request(cfg, precision)
    # A collective waiting on a dead or hung rank fails after this, instead of hanging forever.
    timeout = timedelta(seconds=cfg.runtime.collective_timeout_s)
    process_group = InitProcessGroupKwargs(timeout=timeout)
    join_process_group("nccl" if on_gpu else "gloo", timeout)
    if fsdp is not None and launched_world_size() == 1 and not torch.distributed.is_initialized():
        # FSDP2 shards over a process group, also of one process (resuming a sharded checkpoint on one rank).
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1, timeout=timeout)  # fmt: skip
    kwargs: dict[str, Any] = {}
    if deepspeed_requested():
        use_this_pythons_ninja()
        if cfg.train.compile:  # DeepSpeed's engine hooks parameters itself; compiling under it is untested here
            raise ConfigError(["train.compile: not supported under a DeepSpeed launch; use DDP or one process"])
        kwargs["deepspeed_plugin"] = build_deepspeed_plugin(cfg, launched_world_size(), precision)
        if on_gpu and offloads_to_cpu(kwargs["deepspeed_plugin"]):
            # accelerate launch exports OMP_NUM_THREADS=1; the offloaded optimizer step needs the node's cores.
            set_cpu_threads(cfg.runtime.cpu_threads)
        if not on_gpu:
            # Accelerate uses DeepSpeed only with cpu=False, and then finds no backend without GPUs: name gloo.
            process_group.backend = "gloo"
    # Otherwise Accelerate enters multi-process CPU mode (gloo) only when told cpu=True inside a torchrun-style
    # launch; without it, N launched CPU processes would each train alone as world size 1.
    if cfg.logging.trackers:
        kwargs["log_with"] = check_trackers(cfg.logging.trackers)
        kwargs["project_config"] = ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / TRACKER_DIR)
        )
    # Under FSDP2 the harness shards the model itself (harness/fsdp.py); Accelerate must not apply its own FSDP
    # (on GPUs it would, from the launch's ACCELERATE_USE_FSDP), nor wrap the model in DDP (the loop does not give
    # it the model).
    with patch_environment(ACCELERATE_USE_FSDP="false") if fsdp is not None else contextlib.nullcontext():
        accelerator = Accelerator(
            cpu=not on_gpu and not deepspeed_requested(),
            mixed_precision=MIXED_PRECISION[precision],
            gradient_accumulation_steps=cfg.train.grad_accum,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[process_group],
            **kwargs,
        )
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(
            f"the launcher started {launched_world_size()} processes but Accelerate formed a world of "
            f"{accelerator.num_processes}; check the launch command"
        )
    if "deepspeed_plugin" in kwargs:
        load_models_whole()
    set_seed(cfg.seed)
    return accelerator, RunPlace.of(accelerator, cfg, precision, fsdp)


def check_fsdp_request(cfg: ExperimentConfig, precision: str) -> None:
    """What FSDP2 does not run here, named with the fix."""
    problems = []
    if deepspeed_requested():
        problems.append("FSDP and DeepSpeed in one launch: choose one accelerate config")
    if precision == "fp16":
        problems.append("train.precision: fp16 under FSDP2 needs a sharded loss scaler the harness does not run; use "
                        "bf16 (or fp32)")  # fmt: skip
    if problems:
        raise ConfigError(problems, "launch")


@dataclass(frozen=True)
class RunPlace:
    """Where a run executes and what follows from it, decided once (in `build_accelerator`) and passed down:
    nothing else probes the device, the world or the ZeRO stage again."""

    world_size: int
    rank: int
    is_main: bool
    device: torch.device
    distributed_type: str
    backend: str | None
    zero_stage: int
    """0 without DeepSpeed."""
    precision: str
    """train.precision resolved (auto: bf16, fp16 or fp32 by the device)."""
    tf32: bool
    """fp32 matmuls in TF32 (CUDA, train.tf32)."""
    threads: int
    """Torch threads per process (CPU math; on GPUs the CPU side of an offloaded optimizer)."""
    pad_multiple: int | None
    """Batches padded to a multiple of this: 8 on GPUs (tensor cores); None (the exact longest) elsewhere."""
    pin_memory: bool
    """DataLoaders pin host memory (GPUs: asynchronous copies)."""
    fast_cpu_dropout: bool
    """The CPU speed path (train.fast_cpu_dropout): on CPU only, and not under torch.compile (compiled graphs
    draw their own masks)."""
    keep_freed_memory: bool
    """On CPU, keep freed memory for reuse once setup is done (runtime.keep_freed_cpu_memory)."""
    fsdp: FSDPSettings | None
    """FSDP2 (harness/fsdp.py): the model is sharded by the harness; None for DDP and DeepSpeed."""
    job: str | None
    """The job this process belongs to across its restarts (`job_attempt`); None outside SLURM and torchrun."""
    restart: int
    """0 for a job's first attempt; how many times it was restarted (SLURM requeue, torchrun --max-restarts)."""
    hosts: list[str]
    """Each rank's host name, in rank order (gathered once at start)."""

    @classmethod
    def of(cls, accelerator: Accelerator, cfg: ExperimentConfig, precision: str,
           fsdp: FSDPSettings | None = None) -> RunPlace:  # fmt: skip
        state = accelerator.state
        device = accelerator.device
        on_gpu = device.type == "cuda"
        return cls(
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            is_main=accelerator.is_main_process,
            device=device,
            distributed_type="FSDP2" if fsdp is not None else str(state.distributed_type).split(".")[-1],
            backend=getattr(state, "backend", None),
            zero_stage=zero_stage(accelerator),
            precision=precision,
            tf32=on_gpu and cfg.train.tf32,
            threads=torch.get_num_threads(),
            pad_multiple=8 if on_gpu else None,
            pin_memory=on_gpu,
            fast_cpu_dropout=device.type == "cpu" and cfg.train.fast_cpu_dropout and not cfg.train.compile,
            keep_freed_memory=device.type == "cpu" and cfg.runtime.keep_freed_cpu_memory,
            fsdp=fsdp,
            **dict(zip(("job", "restart"), job_attempt(os.environ), strict=True)),
            hosts=gather_object([socket.gethostname()]) if accelerator.num_processes > 1 else [socket.gethostname()],
        )

    def record(self) -> dict[str, Any]:
        """The place as JSON values (metrics.jsonl's setup event)."""
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("device", "is_main")},
            "device": str(self.device),
            "sharding": self.sharding,
        }

    @property
    def sharding(self) -> str:
        """How the model's training state is laid out over the ranks: ddp, zero1/2/3 or fsdp2 (what a checkpoint
        of this run can resume under)."""
        return "fsdp2" if self.fsdp is not None else f"zero{self.zero_stage}" if self.zero_stage else "ddp"

    def describe(self) -> str:
        tf32 = ", TF32 for fp32 matmuls" if self.tf32 else ""
        if self.fsdp is not None:
            offload = "shards offloaded to CPU memory" if self.fsdp.offload and self.device.type == "cuda" else (
                "offload: on a CPU the shards are in host memory already" if self.fsdp.offload else "")  # fmt: skip
            reshard = "" if self.fsdp.reshard_after_forward else "gathered parameters kept from forward to backward"
            notes = "; ".join(n for n in (offload, reshard) if n)
            tf32 += f", one FSDP2 unit per encoder layer{f' ({notes})' if notes else ''}"
        nodes = sorted(set(self.hosts))
        across = f" on {len(nodes)} hosts ({', '.join(nodes)})" if len(nodes) > 1 else ""
        return (f"world size {self.world_size} ({self.distributed_type}, {self.backend or 'no backend'}){across} "
                f"on {self.device} ({self.threads} thread{'s' if self.threads != 1 else ''} per process), "
                f"precision {self.precision}{tf32}")  # fmt: skip


def job_attempt(env: Mapping[str, str]) -> tuple[str | None, int]:
    """(the job, its restart count) from the launch environment: a SLURM job keeps its id across requeues
    (SLURM_RESTART_COUNT counts them); torchrun restarts its workers under the same agent
    (TORCHELASTIC_RESTART_COUNT), identified by its rendezvous id or, with the static rendezvous ("none"), by the
    agent's host and pid (the workers' parent; under accelerate launch, its process, which runs the agent)."""
    restart = sum(int(env.get(name, "0") or 0) for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}", restart
    if "TORCHELASTIC_RESTART_COUNT" in env:
        run_id = env.get("TORCHELASTIC_RUN_ID", "none")
        return (
            f"torchrun:{run_id}" if run_id != "none" else f"torchrun:{socket.gethostname()}:{os.getppid()}"
        ), restart
    return None, restart


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's and DeepSpeed's wrappers: the one whose param_groups are
    stepped (ZeRO rebuilds those groups around its flat partitions, so schedulers must attach here, after
    `prepare`)."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage in use (0 when DeepSpeed is not)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def memory_report(model: torch.nn.Module, optimizer, place: RunPlace) -> dict[str, int]:
    """Bytes this rank holds, read from the live model and optimizer after the first optimizer step (optimizer
    state is created lazily): parameters, gradients, optimizer moments and, under ZeRO, fp32 master partitions.

    Gradients: without ZeRO and under ZeRO-1 each rank keeps a full gradient per trainable parameter; under
    ZeRO-2/3 only the partition it updates, the size of its fp32 partition."""
    if place.fsdp is not None:
        return fsdp_memory(model, optimizer)
    stage = place.zero_stage
    params = list(model.parameters())
    if stage == 3:  # each rank keeps its partition in ds_tensor; p.data is an empty placeholder
        param_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    else:
        param_bytes = _tensor_bytes(p.data for p in params)
    full_grad_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    if not stage:
        moments = [v for state in inner.state.values() for k, v in state.items() if k != "step"]
        return {"parameters": param_bytes, "gradients": full_grad_bytes, "optimizer_state": _tensor_bytes(moments),
                "fp32_master": 0}  # fmt: skip
    base = inner.optimizer  # DeepSpeed's ZeRO optimizer wraps the torch optimizer, whose state is per partition
    moments = [v for state in base.state.values() for k, v in state.items() if k != "step"]
    master_bytes = _tensor_bytes(
        next(getattr(inner, name) for name in DEEPSPEED_FP32_PARTITIONS if hasattr(inner, name))
    )
    if hasattr(inner, "fp32_groups_gradients_flat"):  # BF16_Optimizer (ZeRO-1 in bf16): full fp32 gradients
        gradient_bytes = _tensor_bytes(inner.fp32_groups_gradients_flat)
    else:
        gradient_bytes = full_grad_bytes if stage == 1 else master_bytes
    return {
        "parameters": param_bytes,
        "gradients": gradient_bytes,
        "optimizer_state": _tensor_bytes(moments),
        "fp32_master": master_bytes,
    }


class SavedActivations:
    """Bytes of the tensors autograd keeps for backward (activations), counted once per storage, inside
    `counting()`: what train.gradient_checkpointing saves. Parameters are not counted; tensors saved inside a
    checkpointed layer are not saved at all (its own hooks recompute them), so they are not counted either."""

    def __init__(self):
        self.bytes = 0
        self._seen: set[int] = set()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return tensor

    def counting(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def first_forward(self):
        """`counting()` the first time (the run's first micro-batch), a no-op after."""
        if self._seen or self.bytes:
            return contextlib.nullcontext()
        self._seen.add(-1)  # counted once, even if nothing is saved
        return self.counting()


DEEPSPEED_FP32_PARTITIONS = (
    "single_partition_of_fp32_groups",
    "fp32_partitioned_groups_flat",
    "fp32_groups_flat_partition",
)
"""Where each DeepSpeed optimizer keeps this rank's fp32 master partitions: ZeRO-1/2, ZeRO-3, and BF16_Optimizer
(what DeepSpeed uses for ZeRO-1 in bf16 with fp32 gradient accumulation, as the harness asks)."""


EXIT_REQUEUE = 75
"""sysexits' EX_TEMPFAIL: stopped by a signal (after a checkpoint, where there was progress to save); the same
command resumes the run."""


class Preempted(Exception):
    """Stopped by SIGTERM/SIGUSR1 after writing a checkpoint; the same command resumes the run."""


def lost_a_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another rank is gone or silent: its process or its node died, or it
    hung past runtime.collective_timeout_s. NCCL raises torch's DistError family; gloo, a RuntimeError from its
    TCP transport ("Connection reset by peer", "Timed out waiting ... for recv")."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and "gloo/transport" in str(exc)


class StoppedBeforeTraining(Preempted):
    """Stopped by SIGTERM/SIGUSR1 during setup, with nothing to save; the same command starts the run."""


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit) stop the run, by phase:

    * setup (before the first training step): at once, with the requeue code; there is nothing to save;
    * training: at the next step boundary, with a checkpoint; a signal during validation or during a
      checkpoint's write lets it finish first (the loop asks `agreed` after each);
    * finish (final export, validation and test, after the last step's checkpoint): at the next point the
      finish asks (between its parts, and between test batches); the requeued run redoes the finish only.
    A second signal exits at once with the requeue code. One signal delivered twice is one request: SLURM
    signals every process of a job step, and torchrun / accelerate launch forward their own copy of a TERM to
    each worker, so a worker under a launcher receives a preemption's TERM twice within milliseconds."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    SAME_REQUEST_S = 2.0
    """A repeat within this many seconds of the first signal is the same request, delivered twice."""

    def __init__(self, exit_code: int = EXIT_REQUEUE):
        self.exit_code = exit_code
        self.requested_at: float | None = None
        self.signal_name = ""
        self.phase = "setup"

    def install(self) -> StopRequest:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested_at is not None:
            if now - self.requested_at < self.SAME_REQUEST_S:
                return  # the launcher's copy of the same signal
            print(f"second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(self.exit_code)
        self.requested_at = now
        self.signal_name = signal.Signals(signum).name
        if self.phase == "setup":  # raised in the main thread, wherever setup is (tokenizing, loading, waiting)
            raise StoppedBeforeTraining(f"{self.signal_name} before the first training step: nothing to save; exiting with code "
                            f"{self.exit_code} (run the same command to start)")  # fmt: skip

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any rank was signalled (collective: every rank asks at the same point)."""
        return agree(accelerator, [self.requested], [])[0]


def prepare(accelerator: Accelerator, place: RunPlace, model: torch.nn.Module, optimizer):
    """The model and optimizer as the run trains them: Accelerate's (DDP, DeepSpeed), or as they are under FSDP2,
    whose model the harness has sharded (`harness.fsdp.shard_model`) before the optimizer was built."""
    if place.fsdp is not None:
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def micro_batch(place: RunPlace, model: torch.nn.Module, last: bool):
    """Context of one micro-batch's forward and backward: under FSDP2 no reduce-scatter or reshard before the
    step's last (`accelerator.accumulate` does the same for DDP, and DeepSpeed its own)."""
    return fsdp_micro_batch(model, last) if place.fsdp is not None else contextlib.nullcontext()


def agree(accelerator: Accelerator, host_flags: list[bool], device_flags: list[torch.Tensor]) -> list[bool]:
    """Each flag is true on every rank if it is true on any rank: the host's flags (signals, clocks) and the
    device's (0-dim bool tensors, e.g. a non-finite loss) in one small all-reduce.

    Host sync: the one read of the result. The host flags travel to the device from pinned memory without a
    sync of their own, so a step that calls this once waits for the device once."""
    device = accelerator.device
    host = torch.tensor(host_flags, dtype=torch.float32)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    flags = torch.cat([host, torch.stack([f.reshape(()).float() for f in device_flags])]) if device_flags else host
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    return [bool(v) for v in flags.tolist()]  # host sync: host flags first, then the device's


def deepspeed_overflow(accelerator: Accelerator) -> bool:
    """Whether DeepSpeed's fp16 loss scaler skipped the step its engine just took inside backward (its engine
    reads the same flag; already on the host)."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    return bool(getattr(engine.optimizer, "overflow", False))


def deepspeed_grad_norm(accelerator: Accelerator) -> torch.Tensor | None:
    """The gradient norm DeepSpeed computed in its last step, as a 0-dim tensor on the device (inf after a step
    it skipped for non-finite gradients); None where its ZeRO-1/2 does not compute one."""
    norm = accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()
    if norm is None:
        return None
    if not isinstance(norm, torch.Tensor):
        return torch.tensor(float(norm), device=accelerator.device)
    # ZeRO-3 with an offloaded optimizer computes it on the host: moved, so the step's flags share a device.
    return norm.reshape(()).float().to(accelerator.device, non_blocking=True)
