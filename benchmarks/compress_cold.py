"""How long ``nnlab compress`` takes from nothing: an empty model cache, one CPU core, full mode (goal: <= 60 s).

A cold run trains everything the deployed network needs: the fp32 baseline,
coring with distillation and the low-bit retraining, then simulates the
integer program and writes both reports.  A second run in the same cache
(``warm``) only loads the trained stages, so it times the rest: costing every
stage, the simulation and the reports.

Each run is a fresh process with its own temporary cache and output folder,
``NNLAB_THREADS=1``, quick mode off, pinned to one CPU with ``taskset -c 0``
when available.  The figures: wall-clock seconds of the cold and the warm run,
the seconds ``compress`` itself reports (``report.json``), and the accuracy
headline, so that a time always belongs to a run that finished.

    python benchmarks/compress_cold.py [--model lenet5] [--repeats 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli_startup import command_line  # the same way to start nnlab (this folder is on sys.path for a script)

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 60.0


def run_once(model: str, cache: Path, out: Path, pin: bool) -> dict:
    """One ``nnlab compress`` run in ``cache``; its wall-clock seconds and what its report says."""
    env = {**os.environ, "NNLAB_CACHE": str(cache), "NNLAB_THREADS": "1", "OMP_NUM_THREADS": "1",
           "NNLAB_QUICK": "0", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("CI", None)  # CI=true would switch quick mode on
    cmd = (["taskset", "-c", "0"] if pin else []) + command_line() + [
        "compress", "--model", model, "--no-progress", "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"nnlab compress --model {model} exited with {proc.returncode}: {proc.stderr[-800:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": round(seconds, 2), "compress_s": round(report["seconds"], 2),
            "quick": report["settings"]["quick"], "headline": report["headline"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5", help="a registered model (default lenet5)")
    parser.add_argument("--repeats", type=int, default=1, help="cold runs, each in a new empty cache (default 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    pin = shutil.which("taskset") is not None
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="nnlab-cold-") as tmp:
            tmp = Path(tmp)
            cold.append(run_once(args.model, tmp / "cache", tmp / "cold", pin))
            warm.append(run_once(args.model, tmp / "cache", tmp / "warm", pin))
    if any(r["quick"] for r in cold):
        raise RuntimeError("the runs were in quick mode; the goal is for full mode")
    figures = {"model": args.model, "pinned_to_one_cpu": pin, "threads": 1, "mode": "full", "goal_s": GOAL_S,
               "cold_s": statistics.median(r["wall_s"] for r in cold),
               "warm_s": statistics.median(r["wall_s"] for r in warm), "runs": {"cold": cold, "warm": warm}}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        h = cold[0]["headline"]
        print(f"nnlab compress --model {args.model}, full mode, one thread{', one CPU' if pin else ''} "
              f"(median of {args.repeats}; goal <= {GOAL_S:.0f} s cold):")
        print(f"  cold (empty cache) {figures['cold_s']:.1f} s   warm (cached stages) {figures['warm_s']:.1f} s")
        print(f"  accuracy {h['accuracy_fp32']:.2f}% -> {h['accuracy_nna']:.2f}% on the NNA, "
              f"{h['compression']:.1f}x smaller, {h['energy_ratio']:.1f}x less energy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
