"""Time every notebook, as an instructor would run it: one core, top to bottom, each on a fresh machine.

Each notebook runs in its own ``jupyter nbconvert --execute`` on CPU 0 only
(``taskset -c 0`` where available) with ``NNLAB_THREADS=1`` and, by default,
an empty model cache of its own, so the time includes training whatever the
notebook needs (each notebook stands alone).  Reported per notebook: wall
time, peak memory (largest process: the kernel) and whether a second
restart-and-run-all gives the same printed numbers (``--twice``).

    python benchmarks/notebooks.py                # full mode, cold cache
    python benchmarks/notebooks.py --quick --json
    python benchmarks/notebooks.py --twice 05     # determinism of notebook 05

With ``--json`` the figures go to stdout as JSON (human-readable lines to stderr).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Runs the command given on its command line and prints the peak RSS (kB) of all its descendants.
_WRAP = ("import resource, subprocess, sys\n"
         "rc = subprocess.call(sys.argv[1:])\n"
         "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
# Numbers that depend on the clock, not on the computation.
_TIMING = re.compile(r"\d+(\.\d+)?\s*(s|ms|µs|us|seconds|sec|it/s|s/it)\b|\d+:\d\d")
# Progress bars, and the memory addresses in an object's repr.
_PROGRESS = re.compile(r"\d+/\d+ \[|it/s\]|s/it\]")
_ADDRESS = re.compile(r"0x[0-9a-f]+")
# Lines that say whether the model cache had to train something (the first run trains, the second loads).
_CACHE_NOTE = re.compile(r"^(Training |Pruning |Quantising |L1 branch|nnlab: cached file|.*done once, then cached)")


def run_notebook(path: Path, *, quick: bool, cache: Path, out: Path) -> dict:
    env = {**os.environ, "NNLAB_THREADS": "1", "NNLAB_QUICK": "1" if quick else "0", "NNLAB_CACHE": str(cache),
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CI", None)
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--output",
           str(out), str(path), "--ExecutePreprocessor.timeout=1800", "--log-level=ERROR"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAP, *cmd], env=env, cwd=path.parent,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    m = re.search(r"PEAK_KB (\d+) (-?\d+)", proc.stdout)
    rc = int(m.group(2)) if m else proc.returncode
    return {"notebook": path.stem, "seconds": round(seconds, 1), "peak_gb": round(int(m.group(1)) / 2**20, 2)
            if m else None, "ok": rc == 0, "error": proc.stderr[-800:] if rc else ""}


def printed_numbers(path: Path) -> list[str]:
    """The text a notebook printed, with clock-dependent figures masked."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    lines = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            for line in str(text).splitlines():
                if _CACHE_NOTE.match(line) or _PROGRESS.search(line):
                    continue
                lines.append(_ADDRESS.sub("0x…", _TIMING.sub("<time>", line)))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="notebook number prefixes (default: all)")
    parser.add_argument("--quick", action="store_true", help="quick mode (as CI runs them)")
    parser.add_argument("--warm", action="store_true", help="share one model cache (not a fresh machine)")
    parser.add_argument("--twice", action="store_true", help="run each twice and compare the printed numbers")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = parser.parse_args(argv)

    paths = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")
                   if not args.only or any(p.name.startswith(o) for o in args.only))
    log = sys.stderr if args.json else sys.stdout
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for path in paths:
            cache = tmp / ("cache" if args.warm else f"cache-{path.stem}")
            first = run_notebook(path, quick=args.quick, cache=cache, out=tmp / f"{path.stem}-1.ipynb")
            if args.twice and first["ok"]:
                second = run_notebook(path, quick=args.quick, cache=cache, out=tmp / f"{path.stem}-2.ipynb")
                a, b = printed_numbers(tmp / f"{path.stem}-1.ipynb"), printed_numbers(tmp / f"{path.stem}-2.ipynb")
                diff = [line for line in difflib.ndiff(a, b) if line[:2] in ("- ", "+ ")]
                first["identical_rerun"] = not diff and second["ok"]
                first["rerun_seconds"] = second["seconds"]
                first["rerun_differences"] = diff[:5]
            rows.append(first)
            print(f"{path.stem:40s} {first['seconds']:7.1f} s  peak {first['peak_gb']} GB  "
                  f"{'ok' if first['ok'] else 'FAILED'}"
                  + (f"  identical rerun: {first.get('identical_rerun')}" if args.twice else ""), file=log, flush=True)
            if not first["ok"]:
                print(first["error"], file=log)
    result = {"mode": "quick" if args.quick else "full", "cache": "warm" if args.warm else "cold",
              "threads": 1, "notebooks": rows, "total_seconds": round(sum(r["seconds"] for r in rows), 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
