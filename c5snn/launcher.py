"""`c5snn workers -n N`: start N worker processes, prefix their output, forward signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from c5snn.config import StudyConfig
from c5snn.errors import DeviceError, OptionError
from c5snn.lease import Timing
from c5snn.runtime import cpu_allocator_env
from c5snn.worker import STOP_SIGNALS


def worker_args(config: StudyConfig, timing: Timing, artifacts: Path) -> list[str]:
    """The `c5snn worker` options that make a child process serve this study like its parent."""
    args = ["--config", str(config.source), "--heartbeat", str(timing.heartbeat_s),
            "--grace", str(timing.grace_s), "--max-attempts", str(timing.budget.max_attempts),
            "--max-disruptions", str(timing.budget.max_disruptions),
            "--db-outage-tolerance", str(timing.db_outage_tolerance_s),
            "--artifacts", str(Path(artifacts).absolute())]
    for assignment in config.overrides:
        args += ["--set", assignment]
    return args


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them for its children:
    that list where it is set (Slurm's GPU binding and Kubernetes' device plugin set it), else
    0..count-1."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def parse_gpus(text: str | None) -> list[str] | None:
    """`"0,1"` -> the CUDA_VISIBLE_DEVICES entries of GPUs 0 and 1 as this process counts them
    (so that under Slurm's binding "0" is the first GPU of the job, not of the node); "all" ->
    every GPU this process sees; None or empty -> None (CPU). Every id must be a GPU this
    process sees: a wrong id would otherwise start workers that fail every point."""
    gpus = [g.strip() for g in (text or "").split(",") if g.strip()]
    if not gpus:
        return None
    visible = visible_gpus()
    if gpus == ["all"]:
        if not visible:
            raise DeviceError("--gpus all: this process sees no CUDA device")
        return visible
    for gpu in gpus:
        if not gpu.isdigit():
            raise DeviceError(f"--gpus {text}: '{gpu}' is not a GPU id (0, 1, ...) or 'all'")
        if int(gpu) >= len(visible):
            raise DeviceError(f"--gpus {text}: GPU {gpu} does not exist; this process sees "
                              f"{len(visible)} CUDA device(s)")
    return [visible[int(gpu)] for gpu in gpus]


def launcher_tag() -> str:
    """What makes this launcher's worker names unique across launchers and machines, and says
    where they run: host, the Slurm task (array job_task, or job) when under Slurm, PID."""
    env = os.environ
    task = (f"slurm{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}."
            if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_JOB_ID" in env
            else f"slurm{env['SLURM_JOB_ID']}." if "SLURM_JOB_ID" in env else "")
    return f"{socket.gethostname()}:{task}{os.getpid()}"


def check_count(n: int, option: str) -> None:
    if n < 1:
        raise OptionError(f"{option} must be >= 1, got {n}")


def default_threads(n_workers: int, gpus: list[str] | None) -> int:
    """Workers sharing the CPU split the cores this process may run on (a Slurm or Kubernetes
    allocation, not the whole node); GPU workers need one thread each."""
    if gpus:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // n_workers)


def launch(
    worker_args: list[str],
    n: int,
    *,
    gpus: list[str] | None,
    threads: int | None,
    echo: Callable[[str], None],
    storage_url: str | None = None,
) -> int:
    """Run N `c5snn worker` processes to the end; returns 0 when all exited 0, else 1.

    Worker i runs on GPU `gpus[i % len(gpus)]` (through CUDA_VISIBLE_DEVICES, so several
    workers may share one GPU) or on the CPU when no GPU is listed. A stop signal sent to this
    process (`c5snn.worker.STOP_SIGNALS`) is forwarded as SIGTERM, so each worker checkpoints
    and releases its trial.
    The storage URL travels in the environment (C5SNN_STORAGE), never on a command line where
    `ps` would show its password.
    """
    check_count(n, "--workers/-n")
    threads = threads or default_threads(n, gpus)
    procs: list[tuple[str, subprocess.Popen]] = []
    tag = launcher_tag()
    for i in range(n):
        name = f"w{i}"
        env = dict(os.environ)
        if storage_url:
            env["C5SNN_STORAGE"] = storage_url
        device = "cpu"
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            device = "cuda"
        else:  # started on jemalloc directly rather than restarting itself (runtime.py)
            env = cpu_allocator_env(env) or env
        cmd = [sys.executable, "-m", "c5snn", "worker", *worker_args, "--name", f"{name}@{tag}",
               "--device", device, "--threads", str(threads)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
            start_new_session=True,  # our signal handler, not the terminal, signals the workers
        )
        procs.append((name, proc))

    def forward(signum, _frame):
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}

    def pump(name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            echo(f"[{name}] {line.rstrip()}")

    pumps = [threading.Thread(target=pump, args=p, daemon=True) for p in procs]
    for t in pumps:
        t.start()
    try:
        codes = {name: proc.wait() for name, proc in procs}
        for t in pumps:
            t.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        echo("workers failed: " + ", ".join(f"{n} (exit {c})" for n, c in failed.items()))
        return 1
    return 0
