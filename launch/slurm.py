"""Read a SLURM allocation from the environment: node count, this node's rank, head node, port, GPUs.

Everything here is a pure function of an environment mapping, so the 4-nodes-x-8-GPUs case is a unit test.
We parse SLURM's hostlist syntax ourselves instead of calling `scontrol show hostnames`: the launcher must
work inside `srun` on compute nodes where the SLURM client tools may be missing, and in tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

PORT_BASE = 15000
"""Derived ports lie in [PORT_BASE, PORT_BASE + PORT_SPAN): above the well-known ports and below Linux's
ephemeral range (32768+), so a port chosen by the kernel for some other connection rarely collides."""
PORT_SPAN = 10000


class LaunchError(ValueError):
    """A launch request that cannot be turned into a command; the message names the fix."""


def expand_hostlist(spec: str) -> list[str]:
    """Expand SLURM hostlist syntax: `gpu-[01-04]`, `node[001-003,007],login1`, `a1,b[2-3]`, `r[1-2]n[1-2]`.

    Zero padding follows the range's first bound (`[08-10]` gives 08, 09, 10); order is kept.
    """
    hosts: list[str] = []
    for item in _split_top_level(spec.strip(), spec):
        hosts.extend(_expand_item(item, spec))
    return hosts


def _split_top_level(text: str, spec: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"hostlist {spec!r}: nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"hostlist {spec!r}: ']' without '['")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"hostlist {spec!r}: '[' without ']'")
    items.append(text[start:])
    if any(not item for item in items):
        raise LaunchError(f"hostlist {spec!r}: empty host name")
    return items


def _expand_item(item: str, spec: str) -> list[str]:
    """Expand the first bracket group of one host pattern, then the rest recursively (cartesian product)."""
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    prefix, rest = item[: match.start()], item[match.end() :]
    hosts = []
    for value in _expand_ranges(match.group(1), spec):
        hosts.extend(_expand_item(prefix + value + rest, spec))
    return hosts


def _expand_ranges(ranges: str, spec: str) -> list[str]:
    values = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if bounds is None:
            raise LaunchError(f"hostlist {spec!r}: {part!r} is not a number or a range like 01-04")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        if int(high) < int(low):
            raise LaunchError(f"hostlist {spec!r}: range {part!r} runs backwards")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return values


def port_for_job(job_id: str) -> int:
    """The rendezvous port of a job: the same on every node of it, different for most concurrent jobs."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def count_device_list(value: str) -> int:
    """Devices in a CUDA_VISIBLE_DEVICES-style list ("0,1,3", UUIDs); "", "-1" and "NoDevFiles" mean none."""
    value = value.strip()
    if value in ("", "-1", "NoDevFiles"):
        return 0
    return len([entry for entry in value.split(",") if entry.strip()])


def gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8", "a100:8",
    "a100:4,v100:4"), else the CUDA_VISIBLE_DEVICES SLURM set, else none.

    Device files are not counted: under SLURM a node's GPUs that the job was not given are not ours.
    """
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        return _int(env, "SLURM_GPUS_ON_NODE")
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:
        total = 0
        for entry in per_node.split(","):
            count = entry.rsplit(":", 1)[-1].split("(")[0]  # "type:count", maybe "count(x2)"
            if not count.isdigit():
                raise LaunchError(f"SLURM_GPUS_PER_NODE={per_node!r}: cannot read a GPU count from {entry!r}")
            total += int(count)
        return total
    if "CUDA_VISIBLE_DEVICES" in env:
        return count_device_list(env["CUDA_VISIBLE_DEVICES"])
    return 0


@dataclass(frozen=True)
class SlurmPlacement:
    """Where this node sits in the job, as every node computes it identically from its environment."""

    nodes: int
    node_rank: int
    head_addr: str
    port: int
    gpus_per_node: int
    cpus_on_node: int | None


def placement_from_env(env: Mapping[str, str]) -> SlurmPlacement:
    """Read the job's placement; MASTER_ADDR / MASTER_PORT, when set, replace the derived head and port."""
    nodelist = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if nodelist is None:
        raise LaunchError(
            "--from-slurm: neither SLURM_JOB_NODELIST nor SLURM_NODELIST is set; run inside an sbatch/srun job "
            "or give --nodes/--node-rank/--head-addr/--port"
        )
    hosts = expand_hostlist(env[nodelist])
    count_name = _first(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    nodes = _int(env, count_name) if count_name else len(hosts)
    if nodes != len(hosts):
        raise LaunchError(f"{count_name}={nodes} but {nodelist}={env[nodelist]!r} names {len(hosts)} hosts")
    rank_name = _first(env, "SLURM_NODEID")
    if rank_name is None:
        raise LaunchError("--from-slurm: SLURM_NODEID is not set; start the launcher with srun, one task per node")
    node_rank = _int(env, rank_name)
    if not 0 <= node_rank < nodes:
        raise LaunchError(f"SLURM_NODEID={node_rank} is outside the job's {nodes} nodes")
    if env.get("MASTER_PORT", "").strip():
        port = _int(env, "MASTER_PORT")
    else:
        job_name = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
        if job_name is None or not env[job_name].strip().isdigit():
            raise LaunchError("--from-slurm: SLURM_JOB_ID is not set (or not a number); set MASTER_PORT instead")
        port = port_for_job(env[job_name])
    cpus_name = _first(env, "SLURM_CPUS_ON_NODE")
    return SlurmPlacement(
        nodes=nodes,
        node_rank=node_rank,
        head_addr=env.get("MASTER_ADDR", "").strip() or hosts[0],
        port=port,
        gpus_per_node=gpus_on_node(env),
        cpus_on_node=_int(env, cpus_name) if cpus_name else None,
    )


def _first(env: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` set to a non-empty value."""
    return next((name for name in names if env.get(name, "").strip()), None)


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name].strip())
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
