"""How fast ``nnlab`` answers ``--help`` and a mistyped option (goal: under 1 s on one core).

The command line parses its options before it loads PyTorch, and checks
bit-depths against the accelerator (``nnlab.nna.config``, which loads
neither PyTorch nor pandas) and the device's spelling before loading it,
so none of these answers should pay for importing it.  Each command's exit
status and message are checked, so that a figure always times the answer
it names.  Each command runs ``--repeats`` times
in a fresh process, pinned to one CPU with ``taskset -c 0`` when available;
the median wall-clock time is reported.

    python benchmarks/cli_startup.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: name -> (arguments, expected exit status, text the answer must contain).
COMMANDS = {
    "help": (["compress", "--help"], 0, "usage: nnlab compress"),
    "bad flag": (["compress", "--sparsity", "lots", "--out", "results"], 2, "--sparsity must be a number"),
    "unknown option": (["compress", "--bogus"], 2, "error:"),
    "bad bit-depth": (["compress", "--weight-bits", "3", "--out", "results"], 2, "supports 4..16 bits per weight"),
    "bad device": (["compress", "--device", "gpu0", "--out", "results"], 2, "--device: device must be"),
}


def command_line() -> list:
    """How to start nnlab: the installed ``nnlab`` script next to this Python, else ``python -m nnlab.cli``."""
    script = Path(sys.executable).with_name("nnlab")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "nnlab.cli"]


def time_command(args: list, repeats: int, pin: bool, status: int = None, expect: str = "") -> list:
    """Wall-clock seconds of ``repeats`` fresh runs of ``nnlab args``, each checked for its exit status and text."""
    prefix = ["taskset", "-c", "0"] if pin else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(prefix + command_line() + args, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - start)
        if proc.returncode not in ((0, 2) if status is None else (status,)) or expect not in proc.stdout + proc.stderr:
            raise RuntimeError(f"nnlab {' '.join(args)} exited with {proc.returncode} (expected {status}, with "
                               f"{expect!r}): {proc.stdout[-300:]} {proc.stderr[-500:]}")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    pin = shutil.which("taskset") is not None
    figures = {"pinned_to_one_cpu": pin, "repeats": args.repeats, "goal_s": 1.0, "commands": {}}
    for name, (cmd, status, expect) in COMMANDS.items():
        times = time_command(cmd, args.repeats, pin, status, expect)
        figures["commands"][name] = {"args": cmd, "median_s": round(statistics.median(times), 3),
                                     "max_s": round(max(times), 3)}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"nnlab start-up, median of {args.repeats} runs{' on one CPU' if pin else ''} (goal < 1 s):")
        for name, f in figures["commands"].items():
            print(f"  {name:15s} {f['median_s']:.3f} s (max {f['max_s']:.3f} s)  nnlab {' '.join(f['args'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
