"""The local launcher: a sweep's runs on this machine, in this process (one worker, the default),
or in several worker processes (--workers N, or --gpus 0,1,...: one per GPU, pinned with
CUDA_VISIBLE_DEVICES), each pulling runs from the sweep directory (fwbw.study.launchers.worker).
--gpus indices count the GPUs this process sees: inside an allocation that set
CUDA_VISIBLE_DEVICES=4,5,6,7, --gpus 0,1 are devices 4 and 5. It returns when every worker has ended."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import torch

from fwbw.files import read_json
from fwbw.schema import require
from fwbw.study.children import die_with_parent
from fwbw.study.launchers.base import (
    Assignment,
    Launch,
    check_none_lost,
    merge_outcomes,
    outcome_counts,
)
from fwbw.study.launchers.worker import interruption_file, worker_command
from fwbw.study.results import write_results


def parse_gpus(text: str) -> tuple[str, ...]:
    """'0,1' -> ('0', '1'): CUDA device indices (or GPU-/MIG- UUIDs), each once."""
    gpus = tuple(text.split(","))
    valid = all(gpu.isdigit() or gpu.startswith(("GPU-", "MIG-")) for gpu in gpus) and len(set(gpus)) == len(gpus)
    require(valid, "gpus", f"expected distinct device indices such as 0,1 (or GPU UUIDs), got {text!r}")
    return gpus


def check_gpus(gpus: tuple[str, ...], device_count: int) -> None:
    """Every index names a CUDA device of this machine (there are `device_count`)."""
    missing = [gpu for gpu in gpus if gpu.isdigit() and int(gpu) >= device_count]
    require(not missing, "gpus", f"this machine has {device_count} CUDA devices; no device {', '.join(missing)}")


def check(options: Launch) -> None:
    """The GPUs to pin workers to are this machine's."""
    if options.gpus:
        check_gpus(options.gpus, torch.cuda.device_count())


def launch(assignment: Assignment, options: Launch) -> dict[str, str]:
    """Train the pending runs with the workers `options` asks for (never more than there are
    pending runs), then rebuild the results table; run id -> status ('skipped': no worker
    trained it)."""
    nproc = assignment.execution.nproc_per_run
    require(nproc == 1 or (options.workers or 1) == 1 or not torch.cuda.is_available(), "workers",
            "with --nproc-per-run on GPUs, give --gpus to pin each worker's processes to GPUs of its own")
    slots = gpu_groups(options.gpus, nproc) or [None] * (options.workers or 1)  # the GPUs to pin each worker to
    slots = slots[: len(assignment.pending())]
    if not slots or slots == [None]:  # nothing to train, or one unpinned worker: this process
        return assignment.work()
    return run_workers(assignment, slots, nproc)


def gpu_groups(gpus: tuple[str, ...], nproc_per_run: int) -> list[str]:
    """The GPUs of each worker: nproc_per_run of them each ('0,1', '2,3'), a run's ranks on its own."""
    require(len(gpus) % nproc_per_run == 0, "gpus",
            f"{len(gpus)} GPUs do not split into groups of {nproc_per_run} (--nproc-per-run), one group per worker")
    return [",".join(gpus[start:start + nproc_per_run]) for start in range(0, len(gpus), nproc_per_run)]


def run_workers(assignment: Assignment, gpus: list[str | None], nproc_per_run: int = 1) -> dict[str, str]:
    """One worker process per entry of `gpus` (pinned to those GPUs, unless None), their output
    passed through; each worker's counts printed, and their outcomes merged."""
    with tempfile.TemporaryDirectory(prefix="fwbw-workers-") as folder:
        files = [Path(folder) / f"worker{index}.json" for index in range(len(gpus))]
        processes = [
            subprocess.Popen(worker_command(assignment, file), env=worker_env(gpu, len(gpus) * nproc_per_run),
                             preexec_fn=die_with_parent)
            for gpu, file in zip(gpus, files)
        ]
        try:
            wait_for_all(processes)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(interruption_line(files)) from None
        outcomes = [read_json(file) if file.is_file() else None for file in files]
    write_results(assignment.out)
    for index, (gpu, outcome) in enumerate(zip(gpus, outcomes)):
        if outcome is not None:
            print(f"worker {index}{'' if gpu is None else f' (GPU {gpu})'}: {outcome_counts(outcome)}")
    lost = [f"worker {index}: {exit_reason(process.returncode)}"
            for index, (process, outcome) in enumerate(zip(processes, outcomes)) if outcome is None]
    check_none_lost(lost, "worker", "any error a worker printed is above")
    return merge_outcomes(outcome for outcome in outcomes if outcome is not None)


def interruption_line(files: list[Path]) -> str:
    """One line for Ctrl-C that ended the workers: how each (writing its outcome to files[i]) stopped."""
    notes = [(index, interruption_file(file)) for index, file in enumerate(files)]
    stopped = [f"worker {index} {read_json(note).split(';')[0]}" for index, note in notes if note.is_file()]
    return f"{', '.join(stopped) or 'interrupted'}; rerun the same command to resume"


def exit_reason(returncode: int) -> str:
    """'exit code 3', or 'killed by SIGKILL' for a worker a signal ended (which printed nothing)."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def worker_env(gpu: str | None, processes: int) -> dict[str, str]:
    """This process's environment for a worker among `processes` training processes: pinned to
    `gpu` (one or more ids, as this process sees them: physical_gpus), with this machine's cores
    shared among the processes (OMP_NUM_THREADS, unless it is set)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = physical_gpus(gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return env


def physical_gpus(gpus: str, visible: str | None) -> str:
    """The devices `gpus` ('0,1': indices as this process numbers them) name, in terms of the
    parent's CUDA_VISIBLE_DEVICES (`visible`): inside an allocation that set it to 4,5,6,7, index
    0 is device 4. UUIDs, and every id where `visible` is unset, are kept as they are."""
    if not visible:
        return gpus
    devices = [device.strip() for device in visible.split(",")]
    mapped = []
    for gpu in gpus.split(","):
        if gpu.isdigit():
            require(int(gpu) < len(devices), "gpus",
                    f"CUDA_VISIBLE_DEVICES={visible} makes {len(devices)} devices visible; no device {gpu}")
            gpu = devices[int(gpu)]
        mapped.append(gpu)
    return ",".join(mapped)


def wait_for_all(processes: list[subprocess.Popen]) -> None:
    """Wait for every process; on Ctrl-C, interrupt those still running and wait for them too
    (a run they held is resumed by the next worker that claims it)."""
    try:
        for process in processes:
            process.wait()
    except KeyboardInterrupt:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes:
            process.wait()
        raise
