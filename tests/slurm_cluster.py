"""A private two-node SLURM cluster for the tests (Debian's slurm-wlm and munge packages):
munged, slurmctld and one slurmd per node started as root on this machine (slurm-wlm is built to
run several slurmds on one host, each as its own node), each with its own state, spool and log
directories under one temporary directory, its own munge key and socket, its own ports and a
generated slurm.conf describing this machine's CPUs and memory (`slurmd -C`) for each node. No
accounting (sacct then fails, as on many small clusters), select/cons_tres, proctrack/linuxproc,
no cgroups. Jobs land on either node; a run spread over nodes (--nodes-per-run 2) uses both.

`slurm_cluster` (session-scoped) starts it once, points SLURM_CONF at it for the tests and their
subprocesses (sbatch, squeue, scancel, srun and submitit read it), and stops every daemon at the
end. Without the packages, or when not root, its tests skip with one line saying why; under
CI=true that is a failure instead. scripts/test.sh installs the packages where it can.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "srun", "sinfo")
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15
NODES = ("fwbw-node1", "fwbw-node2")
PARTITION = "fwbw"
MIN_CPUS = 4
# a requeued job waits cred_expire (120 s by default) before it may start again, and pending jobs are
# looked at every sched_interval (60 s): both shortened so that requeue tests take seconds
CRED_EXPIRE_S = 5
SCHED_INTERVAL_S = 2


def unavailable_reason() -> str | None:
    """Why no private cluster can start here (one line), or None."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not root (slurmd must run jobs as their user)"
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install slurm-wlm munge; scripts/test.sh does as root)"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(name: str) -> str:
    return shutil.which(name, path=_sbin_path()) or name


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_resources() -> str:
    """This machine as slurm.conf node parameters, from `slurmd -C` (CPUs=2 ... RealMemory=24105);
    at least MIN_CPUS CPUs (slurm.conf's config_overrides lets a smaller machine take them), so
    that the tests' two one-CPU jobs run side by side, and a limit of two of them
    (--slurm-max-parallel 2) is SLURM's, not the node's."""
    printed = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    line = next(line for line in printed.splitlines() if line.startswith("NodeName="))
    resources = dict(item.split("=", 1) for item in line.split()[1:] if "=" in item)
    if int(resources["CPUs"]) < MIN_CPUS:
        return f"CPUs={MIN_CPUS} RealMemory={resources['RealMemory']}"
    return " ".join(f"{key}={value}" for key, value in resources.items())


def slurm_conf(root: Path, ctld_port: int, slurmd_ports: list[int], resources: str) -> str:
    """The cluster's slurm.conf: NODES, all on this host, the slurmd of each at its own port and with
    its own spool, pid and log files (%n: the node's name)."""
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {resources} State=UNKNOWN"
                      for node, port in zip(NODES, slurmd_ports))
    return f"""# a private two-node cluster for fwbw's tests (tests/slurm_cluster.py)
ClusterName=fwbwtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval={SCHED_INTERVAL_S},bf_interval={SCHED_INTERVAL_S}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=300
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    conf: Path
    processes: dict[str, subprocess.Popen]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *argv: str, check: bool = True) -> str:
        """A SLURM client command on this cluster; its stdout."""
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def jobs(self) -> dict[str, str]:
        """Job id -> state of every job squeue lists (array tasks one by one)."""
        lines = self.command("squeue", "--noheader", "--array", "--format=%i %T").split()
        return dict(zip(lines[::2], lines[1::2]))

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def launched_steps(self, node: str) -> set[str]:
        """The job steps ("12.1": job 12's second step) whose tasks the node's slurmd has launched."""
        log = self.root / "log" / f"slurmd-{node}.log"
        return set(re.findall(r"launch task StepId=(\d+\.\d+) ", log.read_text(errors="replace")))

    def node_states(self) -> list[str]:
        """Each node's state (sinfo's short name: idle, alloc, ...)."""
        listed = self.command("sinfo", "--noheader", "--Node", "--nodes", ",".join(NODES), "--format=%t", check=False)
        return listed.split()


def start_cluster() -> Cluster:
    """munged, slurmctld and a slurmd per node, up and every node idle; RuntimeError with their logs
    if not."""
    # not under pytest's 0700 tmp folders: munged wants its socket's folders searchable by all
    root = Path(tempfile.mkdtemp(prefix="fwbw-slurm-"))
    root.chmod(0o755)
    for name in ("munge", "state", "spool", "log", *(f"spool/{node}" for node in NODES)):
        (root / name).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ctld_port, *slurmd_ports = free_ports(1 + len(NODES))
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, ctld_port, slurmd_ports, node_resources()))
    cluster = Cluster(root, conf, {})
    munge = root / "munge"
    commands = {
        "munged": [_which("munged"), "--foreground", f"--socket={munge}/munge.socket", f"--key-file={key}",
                   f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
                   f"--log-file={root}/log/munged.log"],
        "slurmctld": [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
        **{f"slurmd-{node}": [_which("slurmd"), "-D", "-N", node, "-f", str(conf)] for node in NODES},
    }
    try:
        for name, command in commands.items():
            with open(root / "log" / f"{name}.out", "wb") as out:
                cluster.processes[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                           env=cluster.env, start_new_session=True)
            if name == "munged":
                _wait_until(lambda: (munge / "munge.socket").exists(), cluster, "munged's socket")
        _wait_until(lambda: cluster.node_states() == ["idle"] * len(NODES), cluster, f"nodes {', '.join(NODES)} idle")
    except BaseException:
        stop_cluster(cluster, remove=False)
        raise
    return cluster


def _wait_until(ready, cluster: Cluster, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [name for name, process in cluster.processes.items() if process.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {START_TIMEOUT_S} s"
            raise RuntimeError(f"local SLURM: no {what} ({why}); logs in {cluster.root}:\n{cluster.logs()}")
        time.sleep(0.2)


def stop_cluster(cluster: Cluster, remove: bool = True) -> None:
    """Cancel every job, wait for them to end, then stop the daemons (slurmds, slurmctld, munged)."""
    if any(name.startswith("slurmd") and process.poll() is None for name, process in cluster.processes.items()):
        try:
            cluster.command("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < deadline and any(
                    state not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT") for state in cluster.jobs().values()):
                time.sleep(0.5)
        except (RuntimeError, subprocess.SubprocessError, OSError):
            pass
    for name in reversed(list(cluster.processes)):
        process = cluster.processes[name]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if remove:
        shutil.rmtree(cluster.root, ignore_errors=True)


def skip_or_fail(reason: str) -> None:
    """Skip with one line, or under CI (CI=true) fail: there the real SLURM tests must run."""
    message = f"no local SLURM: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the real SLURM tests must run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private two-node SLURM cluster, SLURM_CONF pointing at it for the whole session."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    cluster = start_cluster()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
    finally:
        stop_cluster(cluster)
