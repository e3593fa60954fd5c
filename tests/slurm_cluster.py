"""A real one-node SLURM cluster for the farm tests (Debian's slurmctld/slurmd/munge packages).

``start()`` writes a slurm.conf into a private folder, starts munged, slurmctld and slurmd, waits
for the node to be idle and returns the environment (SLURM_CONF) to run sbatch/squeue with.
``ensure_packages()`` installs the packages when running as root in CI. Used by tests/conftest.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def have_packages() -> bool:
    return all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "munged"))


def ensure_packages() -> str | None:
    """Install the packages when allowed (root and CI); returns a reason when unavailable."""
    if have_packages():
        return None
    if os.geteuid() != 0 or not os.environ.get("CI"):
        return "SLURM packages not installed (slurmctld slurmd slurm-client munge); CI installs them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, env=env)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0 or not have_packages():
        return f"could not install SLURM packages: {r.stderr.strip()[-300:]}"
    return None


def _node_line() -> str:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0].split()
    keep = [f for f in first if f.split("=")[0] in ("NodeName", "CPUs", "RealMemory")]
    return " ".join(keep) + " State=UNKNOWN"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.host = socket.gethostname().split(".")[0]

    def write_config(self):
        for sub in ("spool/ctld", "spool/d", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            "ClusterName=likeness-test",
            f"SlurmctldHost={self.host}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=600",
            f"StateSaveLocation={self.root}/spool/ctld",
            f"SlurmdSpoolDir={self.root}/spool/d",
            f"SlurmctldPidFile={self.root}/run/slurmctld.pid",
            f"SlurmdPidFile={self.root}/run/slurmd.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd.log",
            _node_line(),
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self, timeout: float = 30.0):
        self.write_config()
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if key.exists():
            key.chmod(0o400)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        subprocess.run(["slurmctld"], env=self.env, check=True)
        subprocess.run(["slurmd"], env=self.env, check=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node did not come up: {r.stdout} {r.stderr}\n"
                           + (self.root / "log/slurmctld.log").read_text()[-2000:])

    def stop(self):
        for name in ("slurmd", "slurmctld"):
            pidfile = self.root / "run" / f"{name}.pid"
            if pidfile.exists():
                try:
                    pid = int(pidfile.read_text().strip())
                    os.kill(pid, signal.SIGTERM)
                    for _ in range(50):
                        os.kill(pid, 0)
                        time.sleep(0.1)
                except (ProcessLookupError, ValueError):
                    pass
                pidfile.unlink(missing_ok=True)
