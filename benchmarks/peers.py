"""nnlab against its peers, measured side by side in one process: QAT step cost, low-bit accuracy, throughput.

The tools:

* ``nnlab-ste``, ``nnlab-random_subset``: :func:`nnlab.quant.retrain` with
  scales that follow max |w|;
* ``nnlab-ste-lsq``, ``nnlab-random_subset-lsq``: the same with learned steps
  (``scales="learned"``, LSQ);
* ``torch.ao-eager``: PyTorch's eager-mode QAT (QuantStub/DeQuantStub, fused
  conv/linear + ReLU, ``prepare_qat``);
* ``torch.ao-fx``: PyTorch's FX-graph QAT (``prepare_qat_fx``);
* ``brevitas``: Brevitas layers (``QuantConv2d``/``QuantLinear`` with a
  per-tensor max-based weight scale that gets a gradient, ``QuantReLU``,
  ``QuantIdentity`` on the input); skipped, and said so, when Brevitas is not
  installed (``pip install nnlab[peers]``).

Every tool starts from the same trained fp32 network, quantises the weights
per tensor (symmetric, narrow range) to 4, 3 and 2 bits and the activations to
8 bits, calibrates on the same 4 training batches, and trains with the same
loop and optimiser (:func:`nnlab.train.fit`: SGD with Nesterov momentum, one
cycle, ``lr=0.01``) for the same epochs and seeds.  The accuracy is that of
the fake-quantised network on the test set.

Figures (JSON with ``--json``, keyed by tool, model and setting):

* ``qat_step_ratio``: median time of one training step (batch 64) over that
  of the fp32 network, every tool's step and the fp32 step interleaved
  (:func:`nnlab.train.time_training_steps`), setting ``"w4a8-b64"``;
* ``accuracy``: mean test accuracy over the seeds, setting ``"w<bits>a8"``
  (``accuracy_seeds`` holds each seed's figure);
* ``images_per_s``: inference throughput (``--throughput``) at batch 1, 16,
  256 and 1024: the NNA simulator (``nnlab-nna``) on the 4-bit network,
  against PyTorch fp32 (``torch-fp32``) and PyTorch's own int8 engine
  (``torch-int8``), setting ``"b<batch>"``.

Usage::

    python benchmarks/peers.py [--models lenet5,lenet300] [--bits 4,3,2] [--seeds 3]
                               [--tools ...] [--device cpu|cuda] [--threads 1] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

TOOLS = ("nnlab-ste", "nnlab-random_subset", "nnlab-ste-lsq", "nnlab-random_subset-lsq",
         "torch.ao-eager", "torch.ao-fx", "brevitas")
ACT_BITS = 8
CALIBRATION_BATCHES = 4
LR = 0.01


def _say(*args, json_mode=False):
    print(*args, file=sys.stderr if json_mode else sys.stdout, flush=True)


# ---------------------------------------------------------------------------- the tools' quantised networks
def _nnlab(base, data, bits, device):
    from nnlab import quant
    return quant.quantise_model(base, data, bits, ACT_BITS, granularity="per_tensor",
                                calibration_batches=CALIBRATION_BATCHES, device=device)


def _torch_ao_qconfig(bits):
    import torch
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, QConfig
    q = 2 ** (bits - 1) - 1
    weight = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=-q, quant_max=q,
                                    dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** ACT_BITS - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    return QConfig(activation=act, weight=weight)


def _calibrate_observers(model, data, device):
    """Run the calibration batches through a model whose observers watch in training mode."""
    import torch
    model.train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i, (x, _) in enumerate(data.train):
            if i >= CALIBRATION_BATCHES:
                break
            model(x.to(device))


def _torch_ao_eager(base, data, bits, device):
    import torch
    from nnlab.nna.torch_int8 import Int8Model, fusion_groups
    body = copy.deepcopy(base).cpu().train()
    torch.ao.quantization.fuse_modules_qat(body, fusion_groups(body), inplace=True)
    model = Int8Model(body)
    model.qconfig = _torch_ao_qconfig(bits)
    torch.ao.quantization.prepare_qat(model, inplace=True)
    model.to(device)
    _calibrate_observers(model, data, device)
    return model


def _torch_ao_fx(base, data, bits, device):
    import torch
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    x, _ = next(iter(data.train))
    model = prepare_qat_fx(copy.deepcopy(base).cpu().train(), QConfigMapping().set_global(_torch_ao_qconfig(bits)),
                           example_inputs=(x[:1],))
    model.to(device)
    _calibrate_observers(model, data, device)
    return model


def _brevitas(base, data, bits, device):
    import brevitas.nn as qnn
    import torch
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat
    from torch import nn

    def convert(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                new = qnn.QuantConv2d(child.in_channels, child.out_channels, child.kernel_size,
                                      stride=child.stride, padding=child.padding, dilation=child.dilation,
                                      groups=child.groups, bias=child.bias is not None,
                                      weight_quant=Int8WeightPerTensorFloat, weight_bit_width=bits)
            elif isinstance(child, nn.Linear):
                new = qnn.QuantLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                      weight_quant=Int8WeightPerTensorFloat, weight_bit_width=bits)
            elif isinstance(child, nn.ReLU):
                new = qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=ACT_BITS)
            else:
                convert(child)
                continue
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
            setattr(module, name, new)
        return module

    body = convert(copy.deepcopy(base).cpu())
    model = nn.Sequential(qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=ACT_BITS), body).to(device)
    model.eval()
    with torch.no_grad(), calibration_mode(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i, (x, _) in enumerate(data.train):
            if i >= CALIBRATION_BATCHES:
                break
            model(x.to(device))
    return model


def _brevitas_available() -> bool:
    try:
        import brevitas  # noqa: F401
    except ImportError:
        return False
    return True


def build(tool, base, data, bits, device):
    """The tool's quantised network, calibrated and ready to train."""
    if tool.startswith("nnlab-"):
        return _nnlab(base, data, bits, device)
    return {"torch.ao-eager": _torch_ao_eager, "torch.ao-fx": _torch_ao_fx, "brevitas": _brevitas}[tool](
        base, data, bits, device)


def train(tool, model, data, epochs, seed, device):
    """The same loop and optimiser for every tool; nnlab's retrain adds its subset schedule and freezes."""
    from nnlab import quant
    from nnlab.train import fit
    if tool.startswith("nnlab-"):
        method = "random_subset" if "random_subset" in tool else "ste"
        scales = "learned" if tool.endswith("-lsq") else "follow"
        quant.retrain(model, data, epochs, method=method, scales=scales, lr=LR, seed=seed, device=device,
                      progress=False)
    else:
        fit(model, data, epochs, lr=LR, seed=seed, device=device, progress=False)
    return model.eval()


def prepare_for_timing(tool, model):
    """Put a network in the state it trains in (nnlab: grids tracking, a half subset, or learned steps)."""
    from nnlab import quant
    if not tool.startswith("nnlab-"):
        return model
    learned = tool.endswith("-lsq")
    for layer in quant.weight_layers(model).values():
        q = quant.weight_quantiser(layer)
        q.track = not learned
        if learned:
            q.learn_scale(quant.quantiser_input(layer))
        if "random_subset" in tool:
            q.set_subset(0.5, redraw=True)
    if learned:
        for a in quant.act_quantisers(model).values():
            a.learn_scale()
    return model


# ---------------------------------------------------------------------------- throughput
def throughput(name, base, data, device, batches, json_mode, repeats=3):
    """Images per second of the NNA simulator, PyTorch fp32 and PyTorch int8 at each batch size (CPU)."""
    import numpy as np
    import torch
    from nnlab import nna, quant
    images = torch.cat([x for x, _ in data.test])
    fp32 = copy.deepcopy(base).cpu().eval()
    q4 = quant.quantise_model(fp32, data, 4, ACT_BITS)
    program = nna.compile_model(q4, tuple(images.shape[1:]))
    before = torch.backends.quantized.engine
    try:
        int8 = nna.quantise_torch_int8(fp32, data)
        runners = {"nnlab-nna": lambda x: nna.run(program, x.numpy()),
                   "torch-fp32": lambda x: fp32(x), "torch-int8": lambda x: int8(x)}
        out = {tool: {} for tool in runners}
        for b in batches:
            reps = max(1, min(64, 1024 // b))
            x = images[:b] if b <= len(images) else images.repeat((b + len(images) - 1) // len(images), 1, 1, 1)[:b]
            for tool, fn in runners.items():
                with torch.no_grad():
                    fn(x)  # warm-up
                    best = np.inf
                    for _ in range(repeats):  # best of a few: the least disturbed by other work on the machine
                        start = time.perf_counter()
                        for _ in range(reps):
                            fn(x)
                        best = min(best, (time.perf_counter() - start) / reps)
                out[tool][f"b{b}"] = b / best
            _say(f"  {name} batch {b:4d}: " + "  ".join(f"{t} {out[t][f'b{b}']:,.0f}/s" for t in runners),
                 json_mode=json_mode)
    finally:
        torch.backends.quantized.engine = before
    return out


# ---------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,lenet300", help="comma-separated zoo models (nnlab.cache.RECIPES)")
    parser.add_argument("--bits", default="4,3,2", help="comma-separated weight bit-depths")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=None, help="retraining epochs (default 3; 1 in quick mode)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {', '.join(TOOLS)}")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads")
    parser.add_argument("--no-accuracy", action="store_true", help="time the steps only")
    parser.add_argument("--throughput", action="store_true",
                        help="also measure inference images/s at batch 1, 16, 256, 1024 (simulator, fp32, int8; CPU)")
    parser.add_argument("--quick", action="store_true", help="quick mode (as NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        parser.error(f"--tools: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(TOOLS)}")
    try:
        bits_list = [int(b) for b in args.bits.split(",") if b]
    except ValueError:
        parser.error(f"--bits must be comma-separated integers, got {args.bits!r}")
    if not bits_list or any(not 2 <= b <= 8 for b in bits_list):
        parser.error(f"--bits must be bit-depths in 2..8 (torch.ao's qint8 holds at most 8), got {args.bits!r}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")

    import torch

    import nnlab
    from nnlab import pick
    from nnlab.cache import RECIPES, pretrained
    from nnlab.data import load_data
    from nnlab.train import accuracy, resolve_device, time_training_steps

    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in RECIPES]
    if bad:
        parser.error(f"--models: unknown {', '.join(map(repr, bad))}; choose from {', '.join(RECIPES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = resolve_device(device)
    except (ValueError, TypeError) as exc:
        parser.error(f"--device: {exc}")
    nnlab.set_threads(args.threads)
    epochs = args.epochs or pick(full=3, quick=1)
    say = lambda *a: _say(*a, json_mode=args.json)  # noqa: E731
    skipped = {}
    if "brevitas" in tools and not _brevitas_available():
        tools.remove("brevitas")
        skipped["brevitas"] = "not installed (pip install brevitas, or nnlab[peers])"
        say("brevitas: not installed, skipped (pip install brevitas, or nnlab[peers])")
    import warnings
    warnings.filterwarnings("ignore", module="brevitas")
    warnings.filterwarnings("ignore", module="torch.ao")

    start = time.perf_counter()
    data = load_data(verbose=not args.json)
    results = {"qat_step_ratio": {t: {} for t in tools}, "accuracy": {t: {} for t in tools},
               "accuracy_seeds": {t: {} for t in tools}, "images_per_s": {}, "fp32_accuracy": {},
               "settings": {"device": str(dev), "threads": args.threads, "epochs": epochs, "seeds": args.seeds,
                            "act_bits": ACT_BITS, "granularity": "per_tensor", "lr": LR, "batch": 64,
                            "skipped": skipped}}
    for name in models:
        base = pretrained(name, data=data, device=dev, verbose=not args.json).to(dev)
        results["fp32_accuracy"][name] = accuracy(base, data)
        say(f"{name}: fp32 {results['fp32_accuracy'][name]:.1f}%  ({epochs} epochs, {args.seeds} seeds, "
            f"device {dev}, {args.threads} thread(s))")

        # step time: every tool and fp32 take turns in the same rounds
        batch = next(iter(data.train))
        nets = {"fp32": copy.deepcopy(base)}
        for tool in tools:
            nets[tool] = prepare_for_timing(tool, build(tool, base, data, 4, dev))
        steps = time_training_steps(nets, batch, device=dev, rounds=pick(full=30, quick=5), warmup=2)
        for tool in tools:
            results["qat_step_ratio"][tool][name] = {"w4a8-b64": steps[tool] / steps["fp32"]}
        say(f"  step time over fp32 ({1e3 * steps['fp32']:.2f} ms): "
            + "  ".join(f"{t} {steps[t] / steps['fp32']:.2f}" for t in tools))

        if not args.no_accuracy:
            for bits in bits_list:
                key = f"w{bits}a{ACT_BITS}"
                seeds = {t: [] for t in tools}
                for seed in range(args.seeds):
                    for tool in tools:  # interleaved: each seed runs every tool before the next seed
                        torch.manual_seed(seed)
                        model = train(tool, build(tool, base, data, bits, dev), data, epochs, seed, dev)
                        seeds[tool].append(accuracy(model, data))
                for tool in tools:
                    results["accuracy_seeds"][tool].setdefault(name, {})[key] = seeds[tool]
                    results["accuracy"][tool].setdefault(name, {})[key] = sum(seeds[tool]) / len(seeds[tool])
                say(f"  {key}: " + "  ".join(f"{t} {results['accuracy'][t][name][key]:.2f}%" for t in tools))

        if args.throughput:
            per_tool = throughput(name, base, data, dev, (1, 16, 256, 1024), args.json)
            for tool, figures in per_tool.items():
                results["images_per_s"].setdefault(tool, {})[name] = figures
    results["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
