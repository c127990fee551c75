"""A one-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

Debian's ``slurm-wlm`` and ``munge`` packages, run as root. Everything the
daemons write (munge key and socket, slurm.conf, state, spool, logs) lives in
one temporary folder; client commands find the cluster through
``SLURM_CONF`` (see :attr:`SlurmTestCluster.env`). The node declares two GPUs
backed by ``/dev/null`` and ``/dev/zero`` (no cgroups are used:
``TaskPlugin=task/none``), so GPU requests of the deploy scripts
(``--gres=gpu:N``, ``--gpus-per-task``) are scheduled as on a GPU node while
the workers compute with numpy.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "srun")
PARTITION = "debug"
GPUS = ("/dev/null", "/dev/zero")


def missing_requirements() -> str | None:
    """Why a cluster cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "the SLURM test cluster runs its daemons as root"
    absent = [b for b in (*DAEMONS, *CLIENTS, "runuser") if shutil.which(b) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install -y slurm-wlm munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (apt-get install -y munge creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return max(1024, total_kb // 1024 // 2)  # half the machine: jobs may not take it all


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


class SlurmTestCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (kills jobs, then the daemons)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="hetero-dask-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.cpus = os.cpu_count() or 1
        self.memory_mb = _node_memory_mb()
        self._pid_files: list[Path] = []

    @property
    def env(self) -> dict:
        """This process's environment plus ``SLURM_CONF`` (for sbatch, squeue, dask-jobqueue)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout_s: float = 30) -> SlurmTestCluster:
        # munged refuses keys and sockets in folders others can write to or not traverse.
        os.chmod(self.root, 0o755)
        munge_dir = self.root / "munge"
        key_dir = munge_dir / "key"
        key_dir.mkdir(parents=True)
        os.chmod(munge_dir, 0o755)
        os.chmod(key_dir, 0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        user = pwd.getpwnam("munge")
        for p in (munge_dir, key_dir, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        sock = munge_dir / "munge.socket"
        self._pid_files.append(munge_dir / "munged.pid")
        self._run(
            [
                "runuser", "-u", "munge", "--", "munged",
                f"--socket={sock}", f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}",
            ]
        )
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        self.conf.write_text(self._slurm_conf(sock))
        # gres.conf is read from slurm.conf's folder
        (self.root / "gres.conf").write_text(f"Name=gpu File={','.join(GPUS)}\n")
        for daemon in ("slurmctld", "slurmd"):
            self._pid_files.append(self.root / f"{daemon}.pid")
            self._run([daemon])
        self._wait_idle(timeout_s)
        return self

    def _slurm_conf(self, munge_socket: Path) -> str:
        r = self.root
        return "\n".join(
            [
                "ClusterName=hetero-dask-test",
                f"SlurmctldHost={self.host}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={munge_socket}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "MpiDefault=none",
                "ReturnToService=2",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                f"StateSaveLocation={r / 'state'}",
                f"SlurmdSpoolDir={r / 'spool'}",
                f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                f"SlurmdPidFile={r / 'slurmd.pid'}",
                f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                "KillWait=5",
                "MinJobAge=300",
                "GresTypes=gpu",
                f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                f"RealMemory={self.memory_mb} Gres=gpu:{len(GPUS)} State=UNKNOWN",
                f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _run(self, cmd: list[str]) -> None:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(
                f"{cmd[0] if cmd[0] != 'runuser' else cmd[4]} failed ({res.returncode}): "
                f"{res.stderr.strip()}\nlogs in {self.root}"
            )

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            res = subprocess.run(
                ["sinfo", "-h", "-n", self.host, "-o", "%T"], env=self.env, capture_output=True, text=True
            )
            state = res.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM node is '{state}', not idle, after {timeout_s} s; logs in {self.root}")

    def squeue(self) -> list[tuple[str, str, str]]:
        """``(job id, name, state)`` of every job the controller knows, finished ones included."""
        res = subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i|%j|%T"], env=self.env, capture_output=True, text=True
        )
        return [tuple(line.split("|")) for line in res.stdout.split()]

    def wait_job(self, job_id: str, timeout_s: float) -> str:
        """Wait until job ``job_id`` leaves PENDING/RUNNING; return its final state."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {j: s for j, _, s in self.squeue()}
            if states.get(job_id) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", None):
                return states[job_id]
            time.sleep(0.5)
        raise TimeoutError(f"SLURM job {job_id} still {states.get(job_id)} after {timeout_s} s")

    def stop(self, timeout_s: float = 30, keep_files: bool = False) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged (in that order), then remove
        the cluster's folder unless ``keep_files`` (its logs tell why a start failed)."""
        if self.conf.is_file():
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and any(
                s in ("RUNNING", "COMPLETING", "CONFIGURING") for _, _, s in self.squeue()
            ):
                time.sleep(0.2)
        for pid_file in reversed(self._pid_files):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pid_files.clear()
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)
