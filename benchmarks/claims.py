"""Measure the spread of every notebook claim over seeds and thread counts.

Each notebook states results ("retraining wins back more than half a point")
and checks them with :func:`nnlab.claims.claim`.  On 1,000 test images one
image is 0.1 percentage points, and the figures move with the random seed
and with the number of CPU threads (which changes the order of floating-point
sums).  This script runs the notebooks top to bottom in full mode, once per
seed (``NNLAB_SEED``) and thread count (``NNLAB_THREADS``), each
configuration on an empty model cache of its own, and collects every claim's
measured value, so a margin can be grounded in the spread and re-measured on
another machine.

    python benchmarks/claims.py                          # seeds 0 1 2, threads 1 2, full mode
    python benchmarks/claims.py --seeds 0 --threads 1 02 05
    python benchmarks/claims.py --config 0:1 1:1 2:1 0:2   # three seeds on one thread, seed 0 on two
    python benchmarks/claims.py --json --work build/claims > build/claims.json

``--work DIR`` keeps the model caches, executed notebooks and claim logs in
``DIR``; run the same command again and the notebooks that already ran there
are read back, not rerun (on a loaded machine a sweep can take hours).

A failing claim does not stop its notebook here (``NNLAB_CLAIMS_KEEP_GOING=1``):
the point is to measure it.  With ``--json`` the figures go to stdout as JSON
(progress and the table to stderr).  The exit status is 1 when a claim failed
or a notebook raised an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def machine() -> dict:
    """CPU model, its vector extensions that matter for PyTorch's CPU kernels, and the software."""
    import torch

    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "torch": torch.__version__, "python": platform.python_version()}


def run_config(seed: int, threads: int, paths: list[Path], *, quick: bool, work: Path, log) -> list[dict]:
    """Run the notebooks in order with one seed and thread count, on an empty cache shared by them.

    A notebook whose executed copy is already in ``work`` (it ran to the end there) is read back, not rerun.
    """
    name = f"seed{seed}-threads{threads}"
    cache = work / f"cache-{name}"
    runs = []
    for path in paths:
        claims_log = work / f"{name}-{path.stem}.jsonl"
        executed = work / f"{name}-{path.stem}.ipynb"
        timing = work / f"{name}-{path.stem}.seconds"
        if executed.exists() and claims_log.exists():
            claims = [json.loads(line) for line in claims_log.read_text().splitlines()]
            seconds = float(timing.read_text()) if timing.exists() else None
            runs.append({"seed": seed, "threads": threads, "notebook": path.stem, "seconds": seconds, "ok": True,
                         "error": "", "claims": claims, "resumed": True})
            print(f"{name:18s} {path.stem:36s} (ran before in {work})", file=log, flush=True)
            continue
        claims_log.unlink(missing_ok=True)  # a run that did not finish: measure again
        env = {**os.environ, "NNLAB_QUICK": "1" if quick else "0", "NNLAB_SEED": str(seed),
               "NNLAB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "NNLAB_CACHE": str(cache),
               "NNLAB_CLAIMS_LOG": str(claims_log), "NNLAB_CLAIMS_KEEP_GOING": "1", "TQDM_DISABLE": "1"}
        env.pop("CI", None)
        cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               "--output", str(executed), str(path),
               "--ExecutePreprocessor.timeout=3600", "--log-level=ERROR"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=path.parent, capture_output=True, text=True)
        seconds = round(time.perf_counter() - start, 1)
        if proc.returncode == 0:
            timing.write_text(str(seconds))
        claims = [json.loads(line) for line in claims_log.read_text().splitlines()] if claims_log.exists() else []
        runs.append({"seed": seed, "threads": threads, "notebook": path.stem, "seconds": seconds,
                     "ok": proc.returncode == 0, "error": proc.stderr[-1500:] if proc.returncode else "",
                     "claims": claims})
        failed = sum(not c["passed"] for c in claims)
        print(f"{name:18s} {path.stem:36s} {seconds:7.1f} s  {len(claims):3d} claims, {failed} failed"
              + ("" if proc.returncode == 0 else "  NOTEBOOK ERROR"), file=log, flush=True)
    return runs


def spread(runs: list[dict]) -> list[dict]:
    """One row per claim: its bounds and its measured value in every configuration."""
    rows: dict = {}
    for run in runs:
        for c in run["claims"]:
            key = (run["notebook"], c["claim"])
            row = rows.setdefault(key, {"notebook": run["notebook"], "claim": c["claim"], "unit": c["unit"],
                                        "bounds": c["bounds"], "values": {}, "failed_in": []})
            config = f"seed{run['seed']}-threads{run['threads']}"
            row["values"][config] = c["measured"]
            if not c["passed"]:
                row["failed_in"].append(config)
    out = []
    for row in rows.values():
        values = list(row["values"].values())
        row.update(min=min(values), max=max(values), spread=round(max(values) - min(values), 6))
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="notebook number prefixes (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="values of NNLAB_SEED")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="values of NNLAB_THREADS")
    parser.add_argument("--config", nargs="+", metavar="SEED:THREADS",
                        help="run exactly these configurations instead of every seed with every thread count")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at the same time")
    parser.add_argument("--quick", action="store_true", help="quick mode instead of full mode")
    parser.add_argument("--work", type=Path,
                        help="keep caches, executed notebooks and claim logs here, and reuse what already ran there")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = parser.parse_args(argv)
    for name in ("seeds", "threads"):
        bad = [v for v in getattr(args, name) if v < (0 if name == "seeds" else 1)]
        if bad:
            parser.error(f"--{name} must be {'non-negative' if name == 'seeds' else 'positive'} integers, got {bad}")
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive integer, got {args.jobs}")

    paths = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")
                   if not args.only or any(p.name.startswith(o) for o in args.only))
    if not paths:
        parser.error(f"no notebook matches {args.only}")
    log = sys.stderr if args.json else sys.stdout
    configs = [(s, t) for s in args.seeds for t in args.threads]
    if args.config:
        configs = []
        for text in args.config:
            try:
                seed, threads = (int(v) for v in text.split(":"))
            except ValueError:
                parser.error(f"--config takes SEED:THREADS pairs such as 0:1, got {text!r}")
            if seed < 0 or threads < 1:
                parser.error(f"--config {text}: the seed must be >= 0 and the threads >= 1")
            configs.append((seed, threads))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: run_config(*c, paths, quick=args.quick, work=work, log=log), configs))
    runs = [r for rs in results for r in rs]
    rows = spread(runs)
    for row in rows:
        values = " ".join(f"{v:.4g}" for v in row["values"].values())
        bounds = ", ".join(f"{k} {v:g}" for k, v in row["bounds"].items())
        print(f"{row['notebook'][:2]} {'FAIL' if row['failed_in'] else 'ok  '} [{values}]{row['unit']} "
              f"(claim: {bounds}) {row['claim']}", file=log)
    result = {"mode": "quick" if args.quick else "full", "machine": machine(),
              "configs": [f"seed{s}-threads{t}" for s, t in configs], "wall_seconds": round(time.perf_counter() - start, 1),
              "runs": [{k: v for k, v in r.items() if k != "claims"} for r in runs], "claims": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if all(r["ok"] for r in runs) and not any(r["failed_in"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
