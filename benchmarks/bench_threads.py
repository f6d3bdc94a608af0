"""Two `fit` jobs side by side on one machine: wall time with torch's default thread count in each (every core)
against the thread policy's share (`PRIMAPS_THREADS` = cores / 2 each), and one job alone as the reference.

Each job is the real command (`primaps-pipeline fit`, a fresh output directory, so it computes its own
Baseline) on the same feature file and masks. The figure the policy is about: the side-by-side wall time with
shared cores against the default, and both against running the two jobs one after the other.

Example:
    .venv/bin/python benchmarks/bench_threads.py --features /work/study/camvid/train.h5 \
        --masks /work/study/camvid/masks_mean --classes 11 --epochs 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.threads import THREADS_VARIABLE, cores_owned

COMMAND = Path(sys.executable).with_name("primaps-pipeline")


def fit_command(features: Path, masks: Path, classes: int, epochs: int, out: Path) -> list[str]:
    return [str(COMMAND), "fit", "--features", str(features), "--masks", str(masks), "--classes", str(classes),
            "--epochs", str(epochs), "--out", str(out / "model.pt")]


def run_side_by_side(commands: list[list[str]], threads: int | None) -> float:
    """Start every command at once (with `threads` each, or the default) and return the wall time of all."""
    environment = {key: value for key, value in os.environ.items() if key != THREADS_VARIABLE}
    if threads is not None:
        environment[THREADS_VARIABLE] = str(threads)
    started = time.perf_counter()
    processes = [subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for command in commands]
    for process in processes:
        _, errors = process.communicate()
        if process.returncode:
            raise SystemExit(f"fit failed: {errors.strip().splitlines()[-1] if errors.strip() else process.returncode}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--epochs", type=int, default=1)
    arguments = parser.parse_args()
    cores = cores_owned()
    share = max(1, cores // 2)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"# two fits side by side: {cores} cores owned, load average {load}")
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        def fresh(label: str) -> Path:
            path = Path(scratch, label)
            path.mkdir()
            return path

        def commands(label: str, count: int) -> list[list[str]]:
            return [fit_command(arguments.features, arguments.masks, arguments.classes, arguments.epochs,
                                fresh(f"{label}-{job}")) for job in range(count)]

        alone = run_side_by_side(commands("alone", 1), None)
        default = run_side_by_side(commands("default", 2), None)
        shared = run_side_by_side(commands("shared", 2), share)
    print("| run | threads per job | wall s |")
    print("|---|---|---|")
    print(f"| one job alone | {cores} (default) | {alone:.1f} |")
    print(f"| two jobs side by side | {cores} (default) | {default:.1f} |")
    print(f"| two jobs side by side | {share} ({THREADS_VARIABLE}) | {shared:.1f} |")
    print(f"two jobs one after the other would take {2 * alone:.1f} s; side by side with shared cores "
          f"{shared:.1f} s, with the default {default:.1f} s ({default / shared:.2f}× the shared time)")


if __name__ == "__main__":
    main()
