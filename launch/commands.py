"""Intent -> launcher command: a pure function of the request, the environment and a few host facts.

    build_command(Request("zero2", nproc=8), os.environ, Host(gpus=8, cpus=64, free_port=41234))
      -> accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 ... harness/train.py ...

Which launcher for which intent (process counts checked on a CPU-only machine with a probe printing
WORLD_SIZE/RANK/LOCAL_RANK):
* debug: plain `python` -- one process, no launcher, plus small-data overrides so a mistake shows in seconds.
* cpu N: `torchrun --nproc_per_node N`, GPUs hidden (CUDA_VISIBLE_DEVICES=""). The harness builds
  Accelerator(cpu=True), which forms a gloo world inside any torchrun-style launch. Not `accelerate launch --cpu --num_processes N` and not a MULTI_CPU
  accelerate config: both start ONE process (MULTI_CPU multi-process needs mpirun).
* gpus N: `accelerate launch` with multi_gpu.yaml; one process in all is the entry itself (`python ...`, no
  launcher between it and the signals that preempt it). With no GPUs on the node it becomes `cpu N`: same
  world, and torchrun names what actually happens.
* zero1|zero2|zero3|zero3-offload N: `accelerate launch` with configs/accelerate/zero*.yaml. Accelerate's
  DeepSpeed path starts N torchrun-style processes on CPU-only machines too (N ranks seen for N = 2, 3),
  so the same command serves GPUs and the CPU tests. Across nodes we pass `--deepspeed_multinode_launcher
  standard` (one launcher per node, as srun starts them); the default, pdsh, would ssh from a hostfile.
* fsdp|fsdp-offload N: `accelerate launch` with configs/accelerate/fsdp2*.yaml (N torchrun-style processes, also
  without GPUs); the harness shards the model itself (harness/fsdp.py).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from launch.slurm import LaunchError, count_device_list, placement_from_env

DEFAULT_SCRIPT = "harness/train.py"
ACCELERATE_CONFIG_DIR = "configs/accelerate"
ZERO_CONFIGS = {
    "zero1": f"{ACCELERATE_CONFIG_DIR}/zero1.yaml",
    "zero2": f"{ACCELERATE_CONFIG_DIR}/zero2.yaml",
    "zero3": f"{ACCELERATE_CONFIG_DIR}/zero3.yaml",
    "zero3-offload": f"{ACCELERATE_CONFIG_DIR}/zero3_offload.yaml",
}
FSDP_CONFIGS = {
    "fsdp": f"{ACCELERATE_CONFIG_DIR}/fsdp2.yaml",
    "fsdp-offload": f"{ACCELERATE_CONFIG_DIR}/fsdp2_offload.yaml",
}
MULTI_GPU_CONFIG = f"{ACCELERATE_CONFIG_DIR}/multi_gpu.yaml"
INTENTS = ("debug", "cpu", "gpus", *ZERO_CONFIGS, *FSDP_CONFIGS)

DEBUG_OVERRIDES = (
    "train.max_steps=20",
    "data.max_train_samples=256",
    "data.max_eval_samples=128",
    "logging.every_steps=1",
)
"""Appended to a debug run's arguments unless the user set the same key: small data, a log line per step."""


@dataclass(frozen=True)
class Request:
    """What the user asked for: an intent, processes per node, the entry script and its arguments, placement."""

    intent: str
    nproc: int | None = None
    """Processes per node; None: NPROC_PER_NODE, else the node's GPUs."""
    script: str = DEFAULT_SCRIPT
    script_args: tuple[str, ...] = ()
    nodes: int | None = None
    node_rank: int | None = None
    head_addr: str | None = None
    port: int | None = None
    from_slurm: bool = False
    """Read nodes, node rank, head, port and GPUs from the SLURM environment (explicit flags still win)."""
    max_restarts: int = 0
    """Restart every process of this node's group this many times after one fails (torchrun's elastic agent;
    the restarted processes resume from the newest checkpoint)."""


@dataclass(frozen=True)
class Host:
    """Facts about this machine that the runner measures, kept out of build_command so it stays pure."""

    gpus: int = 0
    """GPU devices present (used when neither SLURM nor CUDA_VISIBLE_DEVICES says otherwise)."""
    cpus: int = 1
    """CPU cores this process may use."""
    free_port: int = 29500
    """A port free right now, for single-node runs that were given none."""


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables to add to the inherited environment."""
    notes: list[str] = field(default_factory=list)
    """Decisions worth telling the user (printed to stderr)."""

    def shell(self) -> str:
        """One shell-quoted line that reproduces the command, environment additions first."""
        assignments = [f"{name}={shlex.quote(value)}" for name, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


@dataclass(frozen=True)
class Placement:
    nodes: int
    node_rank: int
    head_addr: str | None
    port: int
    gpus_per_node: int
    cpus_per_node: int


def build_command(request: Request, env: Mapping[str, str], host: Host) -> Command:
    """Turn a request into the launcher command for this node. Raises LaunchError naming the fix."""
    if request.intent not in INTENTS:
        raise LaunchError(f"unknown intent {request.intent!r}; choose one of {', '.join(INTENTS)}")
    if request.intent == "debug":
        return _debug_command(request, env, host)
    place = _placement(request, env, host)
    nproc = _processes_per_node(request, env, place)
    if request.intent == "cpu" or (request.intent == "gpus" and place.gpus_per_node == 0):
        command = _torchrun_command(request, env, place, nproc, hide_gpus=request.intent == "cpu")
        if request.intent == "gpus":
            command.notes.insert(0, f"no GPUs on this node: starting {nproc} CPU gloo processes per node instead")
        return command
    if request.intent == "gpus" and nproc * place.nodes == 1:
        return _one_process_command(request, env, place)
    command = _accelerate_command(request, place, nproc)
    if request.intent in ZERO_CONFIGS and place.gpus_per_node == 0 and "DS_ACCELERATOR" not in env:
        # accelerate launch imports DeepSpeed, which otherwise warns it is "unable to detect" an accelerator.
        command.env["DS_ACCELERATOR"] = "cpu"
    return command


def _debug_command(request: Request, env: Mapping[str, str], host: Host) -> Command:
    if request.from_slurm or (request.nodes or 1) > 1:
        raise LaunchError("debug runs one process on one node; drop --nodes/--from-slurm (or use cpu/gpus/zero*)")
    if request.nproc not in (None, 1):
        raise LaunchError(f"debug runs one process, not {request.nproc}; use `cpu {request.nproc}` or `gpus ...`")
    if request.max_restarts:
        raise LaunchError("debug runs plain python, which restarts nothing; --max-restarts needs cpu/gpus/zero*")
    user_keys = {arg.split("=", 1)[0] for arg in request.script_args if "=" in arg and not arg.startswith("-")}
    extra = [item for item in DEBUG_OVERRIDES if item.split("=", 1)[0] not in user_keys]
    command = Command(["python", request.script, *request.script_args, *extra])
    # One device: with several GPUs visible, show the process only the first, so nothing can spread.
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = count_device_list(visible) if visible is not None else host.gpus
    if gpus > 1:
        command.env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0].strip() if visible is not None else "0"
    return command


def _placement(request: Request, env: Mapping[str, str], host: Host) -> Placement:
    """Nodes, node rank, head, port and GPUs for this node: SLURM first (if asked), explicit flags over it."""
    if request.from_slurm:
        slurm = placement_from_env(env)
        nodes, node_rank, head, port = slurm.nodes, slurm.node_rank, slurm.head_addr, slurm.port
        gpus, cpus = slurm.gpus_per_node, slurm.cpus_on_node or host.cpus
    else:
        nodes, node_rank, head, port = 1, 0, env.get("MASTER_ADDR") or None, None
        visible = env.get("CUDA_VISIBLE_DEVICES")
        gpus = count_device_list(visible) if visible is not None else host.gpus
        cpus = host.cpus
        if env.get("MASTER_PORT", "").strip():
            port = _env_int(env, "MASTER_PORT")
    nodes = request.nodes if request.nodes is not None else nodes
    node_rank = request.node_rank if request.node_rank is not None else node_rank
    head = request.head_addr or head
    port = request.port if request.port is not None else port
    if nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {nodes}")
    if nodes > 1:
        if request.node_rank is None and not request.from_slurm:
            raise LaunchError(f"--nodes {nodes} needs --node-rank R (0 on the head node, up to {nodes - 1})")
        if not head:
            raise LaunchError(f"--nodes {nodes} needs --head-addr HOST: the node-rank-0 host, reachable from all")
        if port is None:
            raise LaunchError(f"--nodes {nodes} needs --port P: the same free port on every node")
    if not 0 <= node_rank < nodes:
        raise LaunchError(f"--node-rank {node_rank} is outside 0..{nodes - 1}")
    if port is None:
        port = host.free_port
    if not 1 <= port <= 65535:
        raise LaunchError(f"port {port} is not a TCP port (1..65535)")
    return Placement(nodes, node_rank, head, port, gpus, cpus)


def _processes_per_node(request: Request, env: Mapping[str, str], place: Placement) -> int:
    """N from the command line, else NPROC_PER_NODE, else one per GPU on this node."""
    if request.nproc is not None:
        nproc = request.nproc
    elif env.get("NPROC_PER_NODE", "").strip():
        nproc = _env_int(env, "NPROC_PER_NODE")
    elif request.intent != "cpu" and place.gpus_per_node > 0:
        nproc = place.gpus_per_node
    else:
        where = "SLURM gave this node no GPUs" if request.from_slurm else "no GPUs are visible"
        raise LaunchError(
            f"{request.intent}: how many processes per node? {where}; give N (`{request.intent} 2`) "
            "or set NPROC_PER_NODE"
        )
    if nproc < 1:
        raise LaunchError(f"processes per node must be >= 1, got {nproc}")
    return nproc


def _torchrun_command(request: Request, env: Mapping[str, str], place: Placement, nproc: int,
                      hide_gpus: bool = False) -> Command:  # fmt: skip
    argv = ["torchrun", "--nproc_per_node", str(nproc)]
    if request.max_restarts:
        argv += ["--max-restarts", str(request.max_restarts)]
    if place.nodes > 1:
        argv += ["--nnodes", str(place.nodes), "--node_rank", str(place.node_rank), "--master_addr", place.head_addr]
    argv += ["--master_port", str(place.port), request.script, *request.script_args]
    command = Command(argv)
    # torchrun alone sets 1 thread per process; share the node's cores instead (unless the user chose).
    if "OMP_NUM_THREADS" not in env:
        command.env["OMP_NUM_THREADS"] = str(max(1, place.cpus_per_node // nproc))
    if hide_gpus:
        # `cpu` means CPU processes: the harness takes a visible GPU wherever it finds one (and rank k asks for
        # cuda:k, which fails past the node's GPU count). Always, not only where GPUs were counted: a SLURM job
        # without --gres on a cluster without device cgroups sees the node's GPUs all the same.
        command.env["CUDA_VISIBLE_DEVICES"] = ""
        if place.gpus_per_node > 0:
            command.notes.append(f"cpu: {nproc} CPU processes per node; the node's GPUs are hidden from them")
    return command


def _one_process_command(request: Request, env: Mapping[str, str], place: Placement) -> Command:
    """One GPU: the entry itself, no launcher in between, so that a signal (SLURM's TERM at preemption) reaches
    it alone and it has the time it needs to checkpoint: accelerate launch's one-process launcher kills its
    process 5 s after a TERM. With --max-restarts, torchrun: something must restart it (30 s after a TERM)."""
    if request.max_restarts:
        return _torchrun_command(request, env, place, 1)
    return Command(["python", request.script, *request.script_args],
                   notes=["gpus: one process in all, started directly (no launcher)"])  # fmt: skip


def _accelerate_command(request: Request, place: Placement, nproc: int) -> Command:
    total = nproc * place.nodes
    config = MULTI_GPU_CONFIG if request.intent == "gpus" else {**ZERO_CONFIGS, **FSDP_CONFIGS}[request.intent]
    argv = ["accelerate", "launch", "--config_file", config, "--num_processes", str(total)]
    if place.nodes > 1:
        argv += ["--num_machines", str(place.nodes), "--machine_rank", str(place.node_rank)]
        argv += ["--main_process_ip", place.head_addr]
    argv += ["--main_process_port", str(place.port)]
    if request.max_restarts:
        argv += ["--max_restarts", str(request.max_restarts)]
    if place.nodes > 1 and request.intent in ZERO_CONFIGS:
        argv += ["--deepspeed_multinode_launcher", "standard"]
    argv += [request.script, *request.script_args]
    return Command(argv)


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name].strip())
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
