"""A real SLURM cluster on localhost for integration tests (Debian's Slurm 22.05 + MUNGE): one node, or several
nodes on this one machine (``SlurmCluster.start(nodes=2)``).

Everything lives in one temporary directory: a private munged (own key and socket), slurmctld and slurmd on free
ports, state, spool, logs and PID files. Nothing system-wide is started or changed, so several clusters (or a
system one) can coexist. ``stop()`` cancels remaining jobs and ends the daemons it started by their PID files.

Several nodes use SLURM's multiple-slurmd mode, which Debian's build has: one ``slurmd -N node<i>`` per node, each on
its own port, spool, log and PID file, and each reached at its own loopback address (``NodeAddr=127.0.0.1<i>``:
all of 127/8 is this machine), so a job spans ``node[1-N]`` with one slurmstepd per node and its tasks tell their
node by SLURM's variables (``SLURMD_NODENAME``, ``SLURM_NODEID``) and the first node by its address, as on a real
cluster. Every node declares all of this machine's CPUs (``slurmd -C``): the nodes share them.

Needs root (slurmd runs jobs as their user; munged is started as the ``munge`` user). ``ensure_slurm_installed``
installs the Debian packages with apt-get when they are missing.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "munged")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}

# Requeued jobs wait cred_expire + 1 seconds before they may start again (120 s by default): shortened here.
# The scheduler normally looks at pending jobs every 60 s (30 s for backfill): every second here.
_CRED_EXPIRE_S = 5


_LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (the message says why)."""


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_slurm_installed(timeout: float = 600.0) -> None:
    """Install Debian's slurmctld, slurmd, slurm-client and munge when missing (apt-get update + install).
    Raises ``SlurmUnavailable`` when they are missing and apt cannot install them."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(_missing_binaries())} missing) and installing "
                               "it with apt-get needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and this machine has no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"'{' '.join(cmd)}' failed (status {proc.returncode}): {' | '.join(tail)}")
    if _missing_binaries():
        raise SlurmUnavailable(f"still missing after apt-get install: {', '.join(_missing_binaries())}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    """``n`` distinct unused TCP ports (all held open while choosing, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _hardware_fields() -> list[str]:
    """This machine's CPUs, sockets, cores and memory as ``slurmd -C`` reports them (``CPUs=2 ... RealMemory=N``)."""
    out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), None)
    if line is None:
        raise SlurmUnavailable(f"'slurmd -C' printed no NodeName line: {out.strip()!r}")
    return [f for f in line.split() if not f.startswith(("NodeName=", "UpTime="))]


def _node_line(hostname: str) -> str:
    """This machine's ``NodeName=...`` line from ``slurmd -C`` (CPUs, sockets, cores, memory) for ``hostname``."""
    return " ".join([f"NodeName={hostname}", "NodeAddr=127.0.0.1", *_hardware_fields(), "State=UNKNOWN"])


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class SlurmCluster:
    """A cluster of ``nodes`` nodes on this machine (partition ``debug``) whose client commands run with ``env``
    (``SLURM_CONF`` set). One node is this host by its name; several are ``node1``, ``node2``, ... (``node_names``)
    at ``node_addrs`` (multiple-slurmd mode, see the module docstring)."""

    def __init__(self, root: Path, nodes: int = 1):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.root = root
        self.hostname = socket.gethostname().split(".")[0]
        self.node_names = [self.hostname] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
        self.node_addrs = ["127.0.0.1"] if nodes == 1 else [f"127.0.0.1{i}" for i in range(1, nodes + 1)]
        self.munge_dir = root / "munge"
        self.slurm_dir = root / "slurm"
        self.conf = self.slurm_dir / "slurm.conf"
        self.munge_socket = self.munge_dir / "run" / "munge.sock"
        self.pid_files = {"slurmctld": self.slurm_dir / "slurmctld.pid",
                          "munged": self.munge_dir / "run" / "munged.pid"}
        if nodes == 1:
            self.pid_files["slurmd"] = self.slurm_dir / "slurmd.pid"
        else:  # one slurmd per node: "slurmd:node1", ... (SlurmdPidFile's %n is the node name)
            self.pid_files.update({f"slurmd:{name}": self.slurm_dir / f"slurmd-{name}.pid" for name in self.node_names})
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # sbatch exports the submitting environment to the job: keep the caller's SLURM job variables (tests may
        # run inside a job) and rendezvous variables left by in-process distributed tests out of it.
        for key in list(self.env):
            if (key.startswith("SLURM_") and key != "SLURM_CONF") or key in _LAUNCHER_VARIABLES:
                del self.env[key]
        self.cpus = 1
        self._started: list[str] = []
        self._owns_root = False

    # --- life cycle ---------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: str | os.PathLike | None = None, timeout: float = 30.0, nodes: int = 1) -> "SlurmCluster":
        """Install SLURM if needed, write the configuration, start munged, slurmctld and a slurmd per node, and wait
        until every node is idle. Raises ``SlurmUnavailable`` when SLURM cannot run here."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local SLURM cluster needs root (slurmd, munged as the munge user)")
        ensure_slurm_installed()
        owns_root = root is None
        if root is None:
            root = tempfile.mkdtemp(prefix="magvit-slurm-")
        cluster = cls(Path(root), nodes)
        cluster._owns_root = owns_root
        try:
            cluster._start_munge()
            cluster._write_conf()
            cluster._start_daemon("slurmctld")
            if nodes == 1:
                cluster._start_daemon("slurmd")
            else:
                for name in cluster.node_names:
                    cluster._run_daemon(f"slurmd:{name}", [_sbin("slurmd"), "-f", str(cluster.conf), "-N", name])
            cluster.wait_for_node(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_munge(self) -> None:
        # munged refuses keys, sockets and logs in directories others can write to, and the munge user must be
        # able to reach its socket: the temp root is made world-readable, munge's own folders private.
        self.root.chmod(0o755)
        import pwd

        try:
            munge = pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("no 'munge' user: the munge package is not installed correctly") from None
        for sub, mode in (("", 0o755), ("run", 0o755), ("etc", 0o700), ("lib", 0o700), ("log", 0o700)):
            path = self.munge_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, munge.pw_uid, munge.pw_gid)
            path.chmod(mode)
        key = self.munge_dir / "etc" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o600)
        cmd = ["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--log-file={self.munge_dir / 'log' / 'munged.log'}",
               f"--pid-file={self.pid_files['munged']}", f"--seed-file={self.munge_dir / 'lib' / 'munged.seed'}"]
        self._run_daemon("munged", cmd)

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.slurm_dir / sub).mkdir(parents=True, exist_ok=True)
        hardware = _hardware_fields()
        match = re.search(r"\bCPUs=(\d+)", " ".join(hardware))
        self.cpus = int(match.group(1)) if match else 1  # per node
        d = self.slurm_dir
        ctld_port, slurmd_port, *node_ports = _free_ports(2 + len(self.node_names))
        if len(self.node_names) == 1:
            nodes = [_node_line(self.hostname)]
            slurmd_files = [f"SlurmdSpoolDir={d / 'spool'}", f"SlurmdPidFile={self.pid_files['slurmd']}",
                            f"SlurmdLogFile={d / 'log' / 'slurmd.log'}"]
        else:  # multiple-slurmd mode: one port each; %n in the slurmd paths is the node name
            nodes = [" ".join([f"NodeName={name}", f"NodeHostname={self.hostname}", f"NodeAddr={addr}", f"Port={port}",
                               *hardware, "State=UNKNOWN"])
                     for name, addr, port in zip(self.node_names, self.node_addrs, node_ports)]
            slurmd_files = [f"SlurmdSpoolDir={d / 'spool' / '%n'}", f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
                            f"SlurmdLogFile={d / 'log' / 'slurmd-%n.log'}"]
        lines = [
            "ClusterName=magvit-test",
            # Jobs derive their rendezvous port from the job id: a random first id keeps two test clusters on one
            # machine from handing out the same ports.
            f"FirstJobId={random.randrange(1000, 15000)}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={_CRED_EXPIRE_S}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d / 'log' / 'jobcomp.txt'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=300",
            "KillWait=15",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            *slurmd_files,
            *nodes,
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _run_daemon(self, name: str, cmd: Sequence[str], timeout: float = 15.0) -> None:
        """Start a self-daemonizing daemon and wait for its PID file (written once it runs)."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{name} did not start (status {proc.returncode}): "
                                   f"{(proc.stderr or proc.stdout).strip()[-500:]}{self._log_tail(name)}")
        self._started.append(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(self.pid_files[name])
            if pid is not None and _alive(pid):
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{name} wrote no live PID to {self.pid_files[name]}{self._log_tail(name)}")

    def _start_daemon(self, name: str) -> None:
        self._run_daemon(name, [_sbin(name), "-f", str(self.conf)])

    def _log_tail(self, name: str, lines: int = 8) -> str:
        log_name = name.replace(":", "-")  # "slurmd:node1" logs to slurmd-node1.log
        path = {"munged": self.munge_dir / "log" / "munged.log"}.get(name, self.slurm_dir / "log" / f"{log_name}.log")
        try:
            text = path.read_text().strip().splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- {path} ---\n" + "\n".join(text)

    def logs(self) -> str:
        """The last lines of every daemon log (for failure messages)."""
        slurmds = [name for name in self.pid_files if name.startswith("slurmd")]
        return "".join(self._log_tail(name, 15) for name in ("slurmctld", *slurmds, "munged"))

    def wait_for_node(self, timeout: float = 30.0) -> None:
        """Wait until every node is idle."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            proc = self.command("sinfo", "-h", "-N", "-o", "%T", check=False)
            states = proc.stdout.split()
            if len(states) == len(self.node_names) and all(s.startswith("idle") for s in states):
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s (states {states!r}){self.logs()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel remaining jobs, then end the daemons this object started (reverse order) by their PID files."""
        if "slurmctld" in self._started:
            self.command("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.command("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.2)
        for name in reversed(self._started):
            pid = _read_pid(self.pid_files[name])
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._started.clear()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- client commands ----------------------------------------------------------------------------------------
    def command(self, *args: str, check: bool = True, timeout: float = 60.0,
                cwd: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(list(args), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (status {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> int:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.command("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...); {} when unknown."""
        proc = self.command("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.25) -> None:
        """Poll ``predicate`` until true; ``TimeoutError`` naming ``what`` (with daemon logs) otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{self.logs()}")

    def wait_finished(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job reaches a final state; returns its ``scontrol`` fields."""
        info: dict[str, str] = {}

        def done() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in FINISHED_STATES

        self.wait(done, timeout, f"job {job_id} to finish (last state {info.get('JobState')!r})")
        return info
