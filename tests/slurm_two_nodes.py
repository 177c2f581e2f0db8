"""A real two-node SLURM cluster on this machine, for tests: each node its own network stack, address and
hostname, its own node-local scratch folder, and one slurmd; slurmctld and munged on the host.

    host (root namespaces)        bridge <prefix>br, 10.<net>.0.1/24; slurmctld, under the host's name
    ├── node1: netns <prefix>n1   10.<net>.0.11 on a veth to the bridge; hostname node1; slurmd -N node1
    └── node2: netns <prefix>n2   10.<net>.0.12 on a veth to the bridge; hostname node2; slurmd -N node2

Each slurmd runs in its node's network namespace and in its own UTS and mount namespaces: the hostname is the
node's, `/etc/hosts` is replaced there by a file naming the controller's host, node1 and node2 (so `node1`, the head node SLURM
names in SLURM_JOB_NODELIST, resolves to node1's address on both nodes, as on a real cluster), and
`<root>/scratch` is a different folder on each node (node-local scratch), while everything else (the
repository, the virtualenv, test folders: the shared file system) is the same. Jobs inherit all of it from
their node's slurmd. Traffic between the nodes crosses the veth links, on the nodes' own addresses.

`stop` removes every daemon, namespace and link it made, also after a failed start. Needs root, iproute2,
util-linux's unshare and Debian's slurm-wlm and munge; `TwoNodeSlurm.unavailable()` says why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.slurm_cluster import LocalSlurm

NODES = ("node1", "node2")


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


class TwoNodeSlurm(LocalSlurm):
    def __init__(self, root: Path):
        super().__init__(root)
        tag = os.getpid() % 10000
        self.prefix = f"hx{tag}"
        self.net = 100 + tag % 150  # 10.<net>.0.0/24, private; the tag keeps concurrent sessions apart
        self.bridge = f"{self.prefix}br"
        self.scratch = root / "scratch"
        """Node-local scratch: this path is a different folder on each node."""
        self.hosts_file = root / "hosts"
        self._made: list[tuple[str, ...]] = []  # teardown commands, run in reverse

    @staticmethod
    def unavailable() -> str | None:
        reason = LocalSlurm.unavailable()
        if reason:
            return reason
        for tool in ("ip", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                return f"two-node SLURM test cluster needs {tool} (iproute2, util-linux)"
        probe = f"hxprobe{os.getpid() % 10000}"
        made = _sh("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"two-node SLURM test cluster needs network namespaces: {made.stderr.strip()}"
        _sh("ip", "netns", "del", probe, check=False)
        return None

    def address(self, node: str) -> str:
        return f"10.{self.net}.0.{11 + NODES.index(node)}"

    def netns(self, node: str) -> str:
        return f"{self.prefix}n{NODES.index(node) + 1}"

    # -- the network ---------------------------------------------------------------------------------------
    def _network(self) -> None:
        host_addr = f"10.{self.net}.0.1"
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("ip", "link", "del", self.bridge))
        _sh("ip", "addr", "add", f"{host_addr}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for index, node in enumerate(NODES, start=1):
            ns, outside, inside = self.netns(node), f"{self.prefix}v{index}", f"{self.prefix}e{index}"
            _sh("ip", "netns", "add", ns)
            self._made.append(("ip", "netns", "del", ns))
            _sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            self._made.append(("ip", "link", "del", outside))
            _sh("ip", "link", "set", outside, "master", self.bridge, "up")
            _sh("ip", "link", "set", inside, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", inside)
            _sh("ip", "-n", ns, "link", "set", inside, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts_file.write_text(  # the controller under the host's name (slurmctld must run where it says)
            f"127.0.0.1 localhost\n{host_addr} {socket.gethostname()}\n"
            + "".join(f"{self.address(n)} {n}\n" for n in NODES)
        )

    def interface(self, node: str) -> str:
        """The host side of a node's link (its counters are the node's traffic)."""
        return f"{self.prefix}v{NODES.index(node) + 1}"

    # -- SLURM ---------------------------------------------------------------------------------------------
    def write_conf(self) -> None:
        for sub in ("state", "scratch", *(f"scratch-{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # A node whose slurmd stops answering is down after 5 s (SLURM's default: 300).
        self.conf.write_text(
            self.conf_text(
                "harnesstwo",
                f"{socket.gethostname()}(10.{self.net}.0.1)",
                {n: self.address(n) for n in NODES},
                os.cpu_count() or 1,
                per_node="-%n",
                extra="SlurmdTimeout=5\nKillWait=5\n",
            )  # fmt: skip
        )

    def start_slurmd(self, node: str) -> None:
        """slurmd in the node's network namespace, with its hostname, /etc/hosts and scratch (UTS and mount
        namespaces of its own, which its jobs inherit)."""
        (self.root / f"spool-{node}").mkdir(exist_ok=True)
        setup = (
            f"hostname {node} && mount --bind {self.hosts_file} /etc/hosts && "
            f"mount --bind {self.root / f'scratch-{node}'} {self.scratch} && "
            f"exec /usr/sbin/slurmd -f {self.conf} -N {node}"
        )
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup file system slurmd needs.
        _sh("nsenter", f"--net=/run/netns/{self.netns(node)}", "unshare", "--uts", "--mount", "--propagation",
            "private", "sh", "-c", setup)  # fmt: skip

    def slurmd_pid(self, node: str) -> int | None:
        path = self.root / f"slurmd-{node}.pid"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def start(self) -> TwoNodeSlurm:
        try:
            self._network()
            self.write_conf()
            self._start_munged()
            subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=self.env)
            for node in NODES:
                self.start_slurmd(node)
            self._wait(lambda: set(self.node_states().values()) == {"idle"}, "two idle nodes")
        except BaseException:
            self.stop()
            raise
        return self

    def fail_node(self, node: str) -> None:
        """As a machine that crashes: its link goes down first (its peers get silence, not a connection reset),
        then its slurmd and every process on it die."""
        _sh("ip", "link", "set", self.interface(node), "down")
        self.kill_node(node)

    def return_node(self, node: str) -> None:
        """The machine back in service: its link up, its slurmd started again (ReturnToService=2 takes it)."""
        _sh("ip", "link", "set", self.interface(node), "up")
        self.start_slurmd(node)

    def kill_node(self, node: str) -> None:
        """As a machine that crashes: its slurmd and every process on it (in its network namespace) SIGKILLed."""
        for pid in _sh("ip", "netns", "pids", self.netns(node), check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        self.run("scontrol", "shutdown", check=False)
        time.sleep(0.5)
        for node in NODES:  # whatever still runs on a node (a job's processes, a slurmd that did not stop)
            self.kill_node(node)
        self.stop_daemon(self.root / "slurmctld.pid", wait_s=5)
        for command in reversed(self._made):
            _sh(*command, check=False)
        self._made.clear()
        if self._started_munged:
            subprocess.run(["pkill", "-u", "munge", "munged"], capture_output=True)

    def logs(self) -> str:
        return "\n".join(
            f"== {name}\n" + (self.root / name).read_text()[-3000:]
            for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in NODES))
            if (self.root / name).exists()
        )
