"""``nnlab``: the course's pipeline from the command line, no notebook needed.

    nnlab compress --model lenet5 --dataset mnist --sparsity 0.9 \\
                   --weight-bits 5 --act-bits 8 --out results/

runs :func:`nnlab.pipeline.compress` (baseline, coring, distillation, L1 with ``--l1``,
post-training quantisation, retraining, the NNA simulator) with progress
bars, and writes to ``--out``:

* ``report.html``: a self-contained page (tables and plots inlined) with
  the stage table, the accuracy/energy and accuracy/bytes plots and the
  simulator's per-layer report;
* ``report.json``: the same figures, for scripts (strict JSON: a figure
  that does not exist, such as the bit-depth of a pooling layer, is ``null``);
* with ``--onnx``, ``model.onnx``: the deployed network as a standard ONNX
  model in the exact form (:func:`nnlab.export.to_onnx`), which ONNX Runtime
  computes bit for bit as the simulator does and model viewers such as
  Netron open.

With ``--budget-bytes N`` (or ``--budget-energy-uj E``, ``--budget-latency-us
T``) the baseline is also given a weight bit-depth and a sparsity per layer
that fit that budget on the simulated NNA
(:func:`nnlab.picker.pick_per_layer`); both reports and the terminal show
the choice and its measured accuracy and costs.

Both show how many sums overflowed the accelerator's accumulator (the
``saturated`` column of the stage table and of the per-layer report, and
``overflow`` in the JSON); when any did, the terminal says so too, with the
accumulator width that would hold them and the accuracy it gives.

``--model`` is a registered network (``lenet5``, ``mobilenet-mnist``,
``torchvision:resnet18`` ...) or your own: ``--model path/to/file.py:make_net``
names a Python file and a function in it that returns an ``nn.Module``
(called with no arguments; it is trained first unless ``--no-train`` says
that it is trained already, e.g. because the function loads its weights).

Every option (and every ``NNLAB_*`` environment variable) is checked
before any training starts; options are parsed before PyTorch is even
loaded, so ``--help`` and a mistyped option answer at once.  Ctrl-C stops
the run with one line and exit status 130; an error during the run is one
line on stderr and exit status 1.  ``--device`` picks
where to train (``cpu``, ``cuda``, ``cuda:N``).  The command runs in one
process: started by ``torchrun`` with several processes it refuses, and
points to ``benchmarks/ddp.py``, the same prune -> distill -> retrain
pipeline with DistributedDataParallel (see the README, "Scaling up").
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.util
import io
import math
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

from . import __version__, config
from ._catalogue import DATASETS, RECIPES, SOURCES
from ._preflight import check_compress_arguments, parse_model_argument
from .base import atomic_write, resolve_device  # light: neither loads PyTorch
from .nna.config import PRESETS

__all__ = ["main", "build_parser", "write_report"]


#: The device strings PyTorch accepts (whether this machine has the device is checked once PyTorch is loaded).
_DEVICE = re.compile(r"^((cpu|cuda|mps)(:[0-9]+)?|auto)$")


def _checked(name: str, convert, kind: str, ok, allowed: str):
    """An argparse ``type`` for the option ``name``: ``convert(text)`` (``int`` or ``float``), if ``ok`` accepts it.

    Text that does not convert is refused as ``"{name} must be {kind}, got 'text'"``, a value that ``ok`` refuses
    as ``"{name} must be {allowed}, got value"``: one line naming the option, what is allowed and what was given.
    """
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{name} must be {allowed}, got {value}")
        return value
    return parse


def _ranged_float(name, low, high, high_open=False):
    if high_open:
        return _checked(name, float, "a number", lambda v: low <= v < high, f"in [{low}, {high})")
    return _checked(name, float, "a number", lambda v: low <= v <= high, f"in [{low}, {high}]")


def _ranged_int(name, low, high):
    return _checked(name, int, "an integer", lambda v: low <= v <= high, f"in {low}..{high}")


def _positive_float(name):
    return _checked(name, float, "a number", lambda v: 0 < v < float("inf"), "a positive, finite number")


def _positive_int(name):
    return _checked(name, int, "a positive integer", lambda v: v > 0, "a positive integer")


def _model_argument(text):
    try:
        parse_model_argument(text, "--model")
    except (ValueError, TypeError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``nnlab`` argument parser (built without loading PyTorch)."""
    parser = argparse.ArgumentParser(
        prog="nnlab", description="nnlab: train neural networks for efficient inference.")
    parser.add_argument("--version", action="version", version=f"nnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    c = sub.add_parser(
        "compress", help="run the whole method on one model and write an HTML and a JSON report",
        description="Baseline -> coring -> distillation -> (L1) -> post-training quantisation -> "
                    "low-bit retraining -> NNA simulator, with every stage costed. Trained stages are "
                    "cached (NNLAB_CACHE), so a second run takes seconds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--model", type=_model_argument, default="lenet5", metavar="MODEL",
                   help=f"network to compress: one of {', '.join(sorted(RECIPES))}, or your own as "
                        f"path/to/file.py:function (a function that returns an nn.Module)")
    c.add_argument("--no-train", action="store_true",
                   help="--model file.py:function returns a trained network: use it as the fp32 baseline as it "
                        "is (registered models are always trained, and cached)")
    c.add_argument("--dataset", choices=list(DATASETS), default="mnist",
                   help="data set to train and test on (mnist works offline)")
    c.add_argument("--source", choices=list(SOURCES), default=None,
                   help="where the data comes from (default: offline for mnist, torchvision otherwise)")
    c.add_argument("--sparsity", type=_ranged_float("--sparsity", 0.0, 1.0, high_open=True), default=0.9,
                   help="target fraction of zero weights, in [0, 1)")
    c.add_argument("--weight-bits", type=_ranged_int("--weight-bits", 2, 16), default=5,
                   help="weight bit-depth (the accelerator preset supports 4..16)")
    c.add_argument("--act-bits", type=_ranged_int("--act-bits", 2, 16), default=8, help="activation bit-depth")
    c.add_argument("--method", choices=["random_subset", "ste"], default="random_subset",
                   help="low-bit retraining: growing random subset, or straight-through on every weight")
    c.add_argument("--hardware", choices=["series2nx", "series2nx-huffman"], default="series2nx",
                   help="accelerator preset (series2nx-huffman: weights may also be stored Huffman-coded)")
    c.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:N or auto")
    c.add_argument("--seed", type=_ranged_int("--seed", 0, 2**31 - 1), default=0, help="seed of every training run")
    c.add_argument("--quick", action="store_true", help="quick mode: fewer epochs (also on when NNLAB_QUICK=1)")
    c.add_argument("--l1", action=argparse.BooleanOptionalAction, default=False,
                   help="also run the L1-regularisation side branch (off by default: the deployed network does not use it)")
    c.add_argument("--sim-images", type=_positive_int("--sim-images"), default=None, metavar="N",
                   help="simulate N test images (a fixed random draw) on the NNA instead of the whole test set; the "
                        "NNA accuracy is then over those N, and both reports say so")
    c.add_argument("--sim-batch-size", type=_positive_int("--sim-batch-size"), default=250, metavar="N",
                   help="test images the NNA simulator runs at once (memory, not results, depends on it; default 250)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--onnx", action="store_true",
                   help="also write model.onnx beside the report: the deployed network as standard ONNX, in the exact "
                        "form ONNX Runtime computes as the simulator does (needs the onnx package: "
                        "pip install \"nnlab[onnx]\")")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--budget-bytes", type=_positive_float("--budget-bytes"), default=None,
                        help="also choose a weight bit-depth and a sparsity per layer so that the NNA stores at "
                             "most this many bytes of weights and parameters")
    budget.add_argument("--budget-energy-uj", type=_positive_float("--budget-energy-uj"), default=None,
                        help="the same for a budget of energy per inference, in microjoules")
    budget.add_argument("--budget-latency-us", type=_positive_float("--budget-latency-us"), default=None,
                        help="the same for a budget of latency per inference, in microseconds")
    c.add_argument("--out", required=True, type=Path, help="directory for report.html and report.json")
    return parser


def _check_out(parser, out: Path):
    """Refuse an --out that cannot become a writable directory (makes it, and tries a write)."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out must be a directory, but {out} is a file")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        parser.error(f"--out {out}: {probe} is a file, so no directory can be made under it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        parser.error(f"--out {out}: cannot write there ({exc.strerror or exc})")


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}td{white-space:nowrap}th{background:#f3f3f3;vertical-align:bottom}
td:first-child,th:first-child{text-align:left}
.scroll{max-width:100%;overflow-x:auto}.headline{font-size:15px;background:#f6f9ff;border:1px solid #cde;
padding:.8em 1.2em}img{max-width:100%;height:auto}code{background:#f3f3f3;padding:1px 4px}
.note{color:#555;font-size:13px}
.warning{font-size:15px;background:#fff4e5;border:1px solid #f0b060;padding:.8em 1.2em;margin:1em 0}"""

#: The simulator's per-layer columns shown in the HTML report (report.json has every column).
REPORT_COLUMNS = ["layer", "op", "w_bits", "a_bits", "density", "format", "storage_B", "fp32_B", "macs", "dram_B",
                  "energy_nJ", "fp32_energy_nJ", "bound", "latency_us", "saturated", "sum_bits"]

#: How the stage table shows each column, and its headings.
_STAGE_FORMATS = {"accuracy": "{:.2f}", "sparsity": "{:.1%}", "weight_bits": "{:.0f}", "act_bits": "{:.0f}",
                  "storage_bytes": "{:,.0f}", "energy_uj": "{:.3f}", "latency_us": "{:.3f}",
                  "compression": "{:.1f}x", "energy_ratio": "{:.1f}x", "saturated": "{:,.0f}", "test_images": "{:,.0f}"}
_STAGE_HEADERS = {"storage_bytes": "storage (bytes)", "energy_uj": "energy (µJ)", "latency_us": "latency (µs)",
                  "weight_bits": "weight bits", "act_bits": "activation bits", "accuracy": "accuracy (%)",
                  "energy_ratio": "energy ratio", "test_images": "test images"}


def _html_table(table, formats: dict, headers: dict | None = None) -> str:
    """``table`` as HTML with each column formatted for people and empty cells for NaN (no jinja2 needed)."""
    # lazy: pandas takes ~0.3 s to import, and --help must answer at once
    import pandas as pd

    def cell(column, v):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return ""
        return formats[column].format(v) if column in formats else v

    shown = pd.DataFrame({(headers or {}).get(c, c): [cell(c, v) for v in table[c]] for c in table.columns})
    return shown.to_html(index=False, border=0)


def write_report(result, out: Path) -> dict:
    """Write ``report.html`` and ``report.json`` for a :class:`nnlab.pipeline.CompressionResult`.

    The page fits a 1,300-pixel window: numbers are rounded for people
    (whole bytes, µJ, percentages), cells that do not apply are empty (no
    NaN), and the per-layer table shows the main columns; ``report.json``
    holds every figure unrounded.

    Args:
        result: what :func:`nnlab.pipeline.compress` returned.
        out: directory for the two files (created if missing).

    Returns:
        The JSON document (also written to ``out/report.json``).
    """
    # lazy: matplotlib and the plots load PyTorch and pandas; only the report needs them
    from matplotlib.figure import Figure

    from .plots.nna import REPORT_FORMATS, plot_nna_costs, plot_stages

    out.mkdir(parents=True, exist_ok=True)
    stages = result.stages
    head = result.headline()
    overflow = getattr(result, "overflow", None)
    choice = getattr(result, "choice", None)
    doc = {"settings": result.settings, "data": result.data_description, "headline": head,
           "stages": stages.to_dict(orient="records"), "seconds": result.seconds, "overflow": overflow,
           "agreement": getattr(result, "agreement", None),
           "nna_layers": result.report.to_dict(orient="records")}
    choice_html = ""
    if choice is not None:
        doc["per_layer_choice"] = {"budget": choice.budget, "how": choice.how,
                                   "predicted": choice.predicted, "measured": choice.measured,
                                   "best_uniform": choice.best_uniform,
                                   "layers": choice.layers.to_dict(orient="records")}
        b = choice.budget
        choice_html = f"""<h2>Per-layer bit-depths and sparsities for a budget</h2>
<p>Budget: <code>{html.escape(b['name'])} = {b['value']:,.6g} {html.escape(b['unit'])}</code>, chosen from the
fp32 baseline by measured per-layer sensitivity (no retraining; choice: {html.escape(choice.how)}).
Measured: <b>{choice.measured['accuracy']:.2f}%</b> accuracy, {choice.measured['storage_bytes']:,} bytes,
{choice.measured['energy_uj']:.3f} µJ, {choice.measured['latency_us']:.3f} µs per inference.</p>
{choice.layers.to_html(index=False, border=0, float_format=lambda v: f"{v:,.4g}")}"""

    figs = []
    for x, label in (("energy_uj", "energy per inference (µJ)"), ("storage_bytes", "weight storage (bytes)")):
        fig = plot_stages(stages, x=x, fig=Figure(figsize=(5.2, 3.2)))
        fig.axes[0].set_xlabel(f"{label}, log scale")
        fig.tight_layout()
        figs.append(_figure_png(fig))
    figs.append(_figure_png(plot_nna_costs(result.report, fig=Figure(figsize=(10.5, 3.4)))))

    layers = result.report[[c for c in REPORT_COLUMNS if c in result.report.columns]]
    settings = ", ".join(f"{k}={v}" for k, v in result.settings.items())
    if overflow:
        warning = f"""<div class="warning"><b>Warning:</b> {html.escape(overflow['message'])}.</div>"""
    elif head.get("saturated") == 0:
        warning = (f"<p>No sum overflowed the {result.settings.get('accumulator_bits', '?')}-bit accumulator on the "
                   f"{_simulated_images(result)}.</p>")
    else:
        warning = ""
    if result.settings.get("sim_images"):
        warning += (f"<p><b>The NNA stage simulated {_simulated_images(result)}</b>, not the whole test set: its "
                    f"accuracy is over those images only.</p>")
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nnlab compress: {html.escape(result.settings['model'])}</title><style>{_CSS}</style></head><body>
<h1>nnlab compress: {html.escape(result.settings['model'])} on {html.escape(result.settings['dataset'])}</h1>
<p>{html.escape(result.data_description)}</p>
<p>Settings: <code>{html.escape(settings)}</code>. Run time {result.seconds:.1f} s.</p>
<div class="headline">Deployed on the {html.escape(result.settings['hardware'])}:
<b>{head['accuracy_nna']:.2f}%</b> accuracy (fp32 dense: {head['accuracy_fp32']:.2f}%),
<b>{head['compression']:.1f}x</b> less storage ({head['nna_bytes']:,} bytes vs {head['fp32_bytes']:,}),
<b>{head['energy_ratio']:.1f}x</b> less energy per inference
({head['nna_energy_uj']:.3f} µJ vs {head['fp32_energy_uj']:.3f} µJ).</div>
{warning}
<h2>Every stage</h2>
<div class="scroll">{_html_table(stages, _STAGE_FORMATS, _STAGE_HEADERS)}</div>
<p class="note">Float stages are costed on the fp32 accelerator (dense float32 weights); quantised stages on the
integer accelerator, from the program the simulator runs. <i>saturated</i>: sums of the simulated
network that overflowed the accelerator's accumulator (only the NNA stage has one).</p>
<h2>Accuracy against cost</h2>
<img alt="accuracy against energy" src="data:image/png;base64,{figs[0]}">
<img alt="accuracy against storage" src="data:image/png;base64,{figs[1]}">
<h2>Where the bytes and joules go (deployed network, per layer)</h2>
<img alt="per-layer costs" src="data:image/png;base64,{figs[2]}">
<div class="scroll">{_html_table(layers, REPORT_FORMATS)}</div>
<p class="note">Bytes per inference, energy in nJ, latency in µs; empty cells do not apply to that layer.
<i>saturated</i>: sums that overflowed the accumulator in this layer, over the test images; <i>sum_bits</i>: bits
the widest sum needed. <code>report.json</code> holds every column of the simulator's report, unrounded.</p>
{choice_html}
</body></html>"""
    atomic_write(out / "report.html", page)
    doc = _finite(doc)
    atomic_write(out / "report.json", json.dumps(doc, indent=2, default=_json_default, allow_nan=False))
    return doc


def _simulated_images(result) -> str:
    """'test images', or 'N of the M test images (a fixed random draw)' when compress ran with sim_images."""
    n = result.settings.get("sim_images")
    if not n:
        return "test images"
    total = int(result.stages.iloc[0]["test_images"]) if "test_images" in result.stages else None
    of = f" of the {total:,}" if total else ""
    return f"{n:,}{of} test images (a fixed random draw)"


def _finite(value):
    """``value`` with every NaN or infinite float replaced by None (JSON has no NaN), recursively."""
    # lazy: NumPy is only needed once a run has finished
    import numpy as np

    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _json_default(value):
    # lazy: NumPy is only needed once a run has finished
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"{category.__name__}: {message}\n"


def main(argv=None) -> int:
    """Run ``nnlab`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Returns:
        0 on success, 1 when the run failed (one line on stderr), 2 for a
        bad option or environment variable (argparse's convention), 130
        when interrupted with Ctrl-C.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("nnlab: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = config.check_environment()
    if problems:
        parser.error("; ".join(problems))
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        parser.error(f"nnlab compress runs in one process, but WORLD_SIZE={world}: to train on several GPUs "
                     f"run `torchrun --nproc_per_node={world} benchmarks/ddp.py --device cuda ...` instead, "
                     f"or pick one GPU with `nnlab compress --device cuda:N`")
    # Checks that need no PyTorch first, so that a mistyped option answers at once.
    hardware = PRESETS[args.hardware]
    if not hardware.min_bits <= args.weight_bits <= hardware.max_bits:
        parser.error(f"--weight-bits {args.weight_bits}: {hardware.name} supports "
                     f"{hardware.min_bits}..{hardware.max_bits} bits per weight")
    if not hardware.min_bits <= args.act_bits <= hardware.max_bits:
        parser.error(f"--act-bits {args.act_bits}: {hardware.name} supports "
                     f"{hardware.min_bits}..{hardware.max_bits} bits per activation")
    if not _DEVICE.match(args.device):
        parser.error(f"--device: device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'; got {args.device!r}")
    if args.onnx and importlib.util.find_spec("onnx") is None:
        parser.error('--onnx needs the onnx package, which is not installed: pip install "nnlab[onnx]"')
    # From here on PyTorch is loaded.

    try:
        resolve_device(args.device)
    except (ValueError, TypeError) as exc:
        parser.error(f"--device: {exc}")
    options = dict(source=args.source, sparsity=args.sparsity, weight_bits=args.weight_bits, act_bits=args.act_bits,
                   method=args.method, hardware=hardware, device=args.device, seed=args.seed,
                   quick=True if args.quick else None, l1=args.l1, verbose=not args.no_progress,
                   train=not args.no_train, sim_images=args.sim_images, sim_batch_size=args.sim_batch_size)
    budgets = {"budget_bytes": args.budget_bytes, "budget_energy_uj": args.budget_energy_uj,
               "budget_latency_us": args.budget_latency_us}
    budgets = {k: v for k, v in budgets.items() if v is not None}
    if budgets:
        options["budget"] = budgets
    try:  # a file.py:function is imported and built here, once: the checked network is the one compressed
        model, *_ = check_compress_arguments(args.model, args.dataset, **options)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        parser.error(" ".join(str(exc).split()))
    _check_out(parser, args.out)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"

    # lazy: the pipeline loads PyTorch; every option is checked before it
    from .pipeline import compress

    from .nna.engine import AccumulatorOverflowWarning

    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccumulatorOverflowWarning)  # printed below, with the summary
            result = compress(model, args.dataset, name=args.model, **options)
        write_report(result, args.out)
        if args.onnx:
            # lazy: ONNX export loads onnx (an optional extra)
            from .export import to_onnx

            onnx_path = args.out / "model.onnx"
            to_onnx(result.program, onnx_path)
    except Exception as exc:  # one line, not a traceback: the options were sound, the run was not
        text = " ".join(str(exc).split()) or "(no message)"
        print(f"nnlab compress: error: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = shown
    head = result.headline()
    overflow = f" | {head['saturated']:,} sums overflowed the accumulator" if head.get("saturated") else ""
    subset = f" on {_simulated_images(result)}" if result.settings.get("sim_images") else ""
    print(f"accuracy {head['accuracy_fp32']:.2f}% -> {head['accuracy_nna']:.2f}%{subset}{overflow} | storage "
          f"{head['compression']:.1f}x smaller | energy {head['energy_ratio']:.1f}x lower | "
          f"report: {args.out / 'report.html'}")
    if args.onnx:
        print(f"ONNX model: {onnx_path} ({onnx_path.stat().st_size:,} bytes)")
    choice = getattr(result, "choice", None)
    if choice is not None:
        b = choice.budget
        print(f"per-layer choice for {b['name'].replace('_', '-')} {b['value']:,.6g} {b['unit']}: accuracy "
              f"{choice.measured['accuracy']:.2f}% | storage {choice.measured['storage_bytes']:,} B | energy "
              f"{choice.measured['energy_uj']:.3f} uJ | latency {choice.measured['latency_us']:.3f} us | bits "
              f"{choice.bits} | zeros {choice.sparsity}")
    if result.overflow:
        print(f"nnlab compress: warning: {result.overflow['message']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
