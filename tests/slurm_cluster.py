"""A real one-node SLURM cluster on this machine, for tests: munged (as the munge user), slurmctld and slurmd
(as root) with a slurm.conf in a temporary folder, on free ports, localhost.

cred_expire is 5 s (SLURM's minimum) instead of 120: a requeued job may start again only once its old
credential has expired, so this is how long a preempted test job waits before it resumes; the schedulers look
at pending jobs every 2 s instead of 30-60 s, so it starts as soon as it may. The node declares twice the
machine's CPUs (config_overrides lets slurmd believe it): the tests' 2-CPU jobs are mostly Python imports and
waiting, so two of them run at once instead of one after the other.

Needs Debian's slurm-wlm and munge packages (.ci/run installs them) and root; `LocalSlurm.unavailable()` says
why not, for a skip message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.ranks import free_port

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")
MUNGE_KEY = Path("/etc/munge/munge.key")


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munged = False

    @staticmethod
    def unavailable() -> str | None:
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
        if missing:
            return f"SLURM test cluster needs {', '.join(missing)} (apt-get install slurm-wlm munge)"
        if os.geteuid() != 0:
            return "SLURM test cluster needs root (slurmd runs jobs as their user)"
        return None

    def write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            self.conf_text(
                "harnesstest",
                "localhost(127.0.0.1)",
                {"localhost": "127.0.0.1"},
                2 * (os.cpu_count() or 1),
                extra="KillWait=30\n",
            )  # fmt: skip
        )

    def conf_text(self, cluster: str, controller: str, nodes: dict[str, str], cpus: int, per_node: str = "",
                  extra: str = "") -> str:  # fmt: skip
        """slurm.conf for `nodes` (name: address) of `cpus` CPUs each; `per_node` (e.g. "-%n") tells the
        slurmds' spool folders, pid and log files apart where several run on this machine."""
        r = self.root
        node_lines = "".join(
            f"NodeName={name} NodeAddr={addr} CPUs={cpus} State=UNKNOWN\n" for name, addr in nodes.items()
        )
        return f"""ClusterName={cluster}
SlurmctldHost={controller}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{per_node}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{per_node}.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd{per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
MinJobAge=600
{extra}{node_lines}PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""

    def _start_munged(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving this machine
        if not MUNGE_KEY.is_file():
            subprocess.run(["mungekey", "--create", "--force"], check=True, capture_output=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o600)
        for folder in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
        self._started_munged = True
        self._wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")

    def start(self) -> LocalSlurm:
        self.write_conf()
        self._start_munged()
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", "localhost"], check=True, env=self.env)
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", "an idle node")
        return self

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        self.run("scontrol", "shutdown", check=False)
        for pid_file in ("slurmctld.pid", "slurmd.pid"):
            self.stop_daemon(self.root / pid_file)
        if self._started_munged:
            subprocess.run(["pkill", "-u", "munge", "munged"], capture_output=True)

    @staticmethod
    def stop_daemon(pid_file: Path, wait_s: float = 10) -> None:
        """Wait for the daemon in `pid_file` to exit (after `scontrol shutdown`), then SIGKILL it."""
        try:
            pid = int(pid_file.read_text())
            for _ in range(int(wait_s * 10)):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, 9)
        except (OSError, ValueError):
            pass

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kwargs)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"sbatch failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's view of a job (the first record for an array), as key -> value."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout.splitlines()[0]
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_until(self, job_id: str, states: set[str], timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not reach {states}: {self.job(job_id)}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            (self.root / name).read_text()[-3000:]
            for name in ("slurmctld.log", "slurmd.log")
            if (self.root / name).exists()
        )

    @staticmethod
    def _wait(ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}")
