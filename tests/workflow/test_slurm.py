"""The smoke config through Snakemake's slurm executor on a one-node SLURM cluster on localhost.

    pytest -m slow tests/workflow/test_slurm.py

Opt-in (marker ``slow``, skipped unless ``-m slow`` selects it). Needs root. Installs Debian's
``slurmctld slurmd slurm-client munge`` with apt when ``slurmctld`` is missing, writes a
slurm.conf for this host into a temporary folder (SLURM_CONF; free ports) and, because the
jobs' ``srun`` reads only the default path, to /etc/slurm/slurm.conf (skipped if one exists, so
a cluster of someone else's is never touched; removed afterwards), starts munged (unless one
answers already), slurmctld and slurmd, waits for the node to be idle, and runs the smoke
config with profiles/slurm (GPU and memory requests scaled down to this node) under
``timeout -s KILL``. Skips cleanly when the
daemons cannot start. Daemons are stopped by the PIDs this test started them with.
Facts behind each step: docs/scale.md, "SLURM on localhost" (SLURM 22.05, plugin 2.8).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.workflow]
TIMEOUT_S = 1500  # 24 SLURM jobs of about 12 s overhead each plus the smoke run's work

SLURM_CONF = """\
ClusterName=vopdtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


REPO = Path(__file__).resolve().parents[2]
SMOKE = ".test/config/config.yaml"


def checkout_copy(dest: Path) -> Path:
    """Copy what a clone would hold (tracked + untracked non-ignored files) into dest."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


def env_for(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=120, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def install_slurm():
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("slurm is not installed and this is not a root Debian machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], timeout=300, env=env)
    pkgs = ["slurmctld", "slurmd", "slurm-client", "munge"]
    proc = run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], 600, env=env)
    if proc.returncode != 0:
        pytest.skip(f"apt-get install {' '.join(pkgs)} failed: {proc.stderr[-500:]}")


def munge_works() -> bool:
    try:
        cred = run(["munge", "-n"], timeout=10)
        return cred.returncode == 0 and run(["unmunge"], 10, input=cred.stdout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: run with -m slow")
    install_slurm()
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    mem_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.8)
    conf = d / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            dir=d,
            cpus=os.cpu_count(),
            mem_mb=mem_mb,
            ctld_port=free_port(),
            slurmd_port=free_port(),
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    # Inside a job the plugin's `srun` does not see SLURM_CONF (measured: "Could not establish a
    # configuration source"), so it must find the config at the default path. Only on a machine
    # with no SLURM of its own: an existing /etc/slurm/slurm.conf is never touched.
    system_conf = Path("/etc/slurm/slurm.conf")
    if system_conf.exists():
        pytest.skip(f"{system_conf} exists: this machine has a SLURM cluster of its own")
    system_conf.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(conf, system_conf)
    request.addfinalizer(lambda: system_conf.unlink(missing_ok=True))
    started: list[int] = []
    procs: list[subprocess.Popen] = []
    try:
        if not munge_works():
            for path in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
                Path(path).mkdir(parents=True, exist_ok=True)
                shutil.chown(path, "munge", "munge")
            run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], timeout=30)
            pid_file = Path("/run/munge/munged.pid")
            if pid_file.is_file():
                started.append(int(pid_file.read_text().split()[0]))
            if not munge_works():
                pytest.skip("munged did not start")
        for cmd in (["slurmctld", "-D", "-i"], ["slurmd", "-D"]):
            with open(d / "log" / f"{cmd[0]}.out", "w") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = run(["sinfo", "-h", "-o", "%t"], timeout=10, env=env)
            if state.returncode == 0 and state.stdout.strip() == "idle":
                break
            time.sleep(1)
        else:
            logs = "\n".join(p.read_text()[-400:] for p in (d / "log").iterdir())
            pytest.skip(f"the SLURM node never became idle:\n{logs}")
        yield env
    finally:
        for proc in procs:
            kill_pid(proc.pid)
        for pid in started:
            kill_pid(pid)


def local_profile(root: Path) -> Path:
    """profiles/slurm with GPU requests dropped and CPUs / memory scaled to this node."""
    profile = yaml.safe_load((root / "profiles/slurm/config.yaml").read_text())
    cpus = os.cpu_count()
    for rule, res in profile["set-resources"].items():
        res.pop("gpu", None)
        res.pop("cpus_per_gpu", None)
        res["mem_mb"] = 3000
        res["cpus_per_task"] = min(res.get("cpus_per_task", cpus), cpus)
        res["runtime"] = 30
        profile["set-resources"][rule] = res
    profile["set-threads"] = dict.fromkeys(profile["set-threads"], cpus)
    profile["default-resources"].update(slurm_partition="debug", mem_mb=2000)
    profile.update({"jobs": 2, "slurm-init-seconds-before-status-checks": 1})
    profile["slurm-keep-successful-logs"] = True
    out = root / "profiles" / "slurm_localtest"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(profile))
    return out


def test_smoke_config_through_the_slurm_executor(slurm_cluster, tmp_path):
    root = checkout_copy(tmp_path)
    profile = local_profile(root)
    env = {**env_for(root), **slurm_cluster}
    cmd = ["timeout", "-s", "KILL", str(TIMEOUT_S), sys.executable, "-m", "snakemake"]
    cmd += ["--configfile", SMOKE, "--workflow-profile", str(profile)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"smoke through SLURM: {seconds:.0f} s, exit {proc.returncode}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (root / "results" / "smoke" / "report.md").is_file()
    # the torch rules ran as SLURM jobs (their logs are kept), the file-only rules locally
    logs = root / ".snakemake" / "slurm_logs"
    ran = {p.name for p in logs.iterdir()} if logs.is_dir() else set()
    assert {"rule_train", "rule_generate", "rule_grade"} <= ran, ran
    assert "rule_summary" not in ran
