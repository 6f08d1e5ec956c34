"""Distributed example: prune -> distill -> quantisation-aware retraining with DistributedDataParallel.

Every rank (process) runs the same pipeline on its own share of the training
images, with nnlab's ordinary helpers on a DDP-wrapped model:

1. fp32 baseline: train the model from scratch (``nnlab.train.fit``);
2. elimination: prune to ``--sparsity`` in a few coring steps, each followed
   by distillation from the baseline (``nnlab.distill.prune_and_distill`` on
   the wrapped model);
3. reduction: post-training quantisation to ``--weight-bits`` /
   ``--act-bits`` (calibration ranges all-reduced across ranks), then
   random-subset retraining (``nnlab.quant.retrain``) under DDP.

It prints the accuracy and time of each stage, the time per epoch, the cost
of one training step with fake quantisation against fp32 (DDP step, this
device), and checks that the final weights, masks and quantisation
parameters are bit-identical on every rank.  The recipes (epochs, learning
rates, batch size) are nnlab's: ``nnlab.cache.RECIPES``,
``nnlab.distill.RECIPE`` and those of ``nnlab.recipes.pretrained_quantised``.
``--batch-size`` is the global batch: each of N ranks takes 1/N of it, so
the optimisation is the one a single process would do.

Usage::

    torchrun --nproc_per_node=2 benchmarks/ddp.py [--quick] [--json]   # 2 ranks (gloo on CPU, nccl on GPUs)
    python benchmarks/ddp.py [--nproc 2] [--quick] [--json]            # starts torchrun itself
    python benchmarks/ddp.py --nproc 1                                 # one ordinary process, no DDP
    torchrun --nproc_per_node=4 benchmarks/ddp.py --device cuda \\
        --dataset cifar10 --source torchvision --model vgg-cifar       # the CIFAR-10 pipeline on 4 GPUs

``--save DIR`` makes every rank write its final model to ``DIR/rank<r>.pt``
(the test compares them bit for bit).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick mode (fewer epochs; as NNLAB_QUICK=1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    parser.add_argument("--nproc", type=int, default=2,
                        help="when not started by torchrun: ranks to start (1: one process without DDP)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    parser.add_argument("--model", default="lenet5", help="a model with a recipe in nnlab.cache.RECIPES")
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or cifar10")
    parser.add_argument("--source", default=None, help="data source: offline, torchvision or auto")
    parser.add_argument("--train-limit", type=int, default=None, help="use at most this many training images")
    parser.add_argument("--test-limit", type=int, default=None, help="use at most this many test images")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=None, help="fp32 epochs (default: the recipe's)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of the pruned network")
    parser.add_argument("--steps", type=int, default=None, help="coring steps (default: nnlab.distill.RECIPE)")
    parser.add_argument("--epochs-per-step", type=int, default=None, help="distillation epochs per coring step")
    parser.add_argument("--qat-epochs", type=int, default=None, help="quantisation-aware retraining epochs")
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="directory where every rank saves its final model")
    return parser.parse_args(argv)


def relaunch(argv, nproc: int) -> int:
    """Run this script again under torchrun with ``nproc`` ranks on this machine; return its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), *argv]
    return subprocess.call(cmd)


def run(args) -> dict:
    """The pipeline on this rank; returns the figures (the same on every rank)."""
    import torch

    import nnlab
    from nnlab import distributed as D
    from nnlab import quant
    from nnlab.cache import RECIPES, atomic_save
    from nnlab.distill import RECIPE as DISTILL_RECIPE
    from nnlab.distill import prune_and_distill
    from nnlab.models import build_model
    from nnlab.prune import sparsity
    from nnlab.train import accuracy, fit, time_training_steps

    if os.environ.get("NNLAB_THREADS") is None:  # share this machine's CPUs among the ranks on it
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nnlab.set_threads(max(1, nnlab.available_cpus() // ranks_here))
    device = D.init_distributed(args.device)
    main = D.is_main_process()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    if not main:
        say = lambda *a: None  # noqa: E731
    n = D.world_size()
    quick = nnlab.quick_mode()
    pick = 1 if quick else 0
    recipe = RECIPES[args.model]
    batch = args.batch_size or recipe["batch_size"]
    if batch % n:
        raise ValueError(f"--batch-size {batch} must be a multiple of the number of ranks ({n})")
    epochs = args.epochs or recipe["epochs"][pick]
    steps = args.steps or DISTILL_RECIPE["steps"][pick]
    epochs_per_step = args.epochs_per_step or DISTILL_RECIPE["epochs_per_step"][pick]
    qat_epochs = args.qat_epochs or (1 if quick else 3)
    backend = torch.distributed.get_backend() if D.is_distributed() else "none (one process)"
    say(f"{n} rank(s) on {device} | backend {backend} | {torch.get_num_threads()} thread(s) per rank | "
        f"{'quick' if quick else 'full'} mode")

    data = nnlab.data.load_data(args.dataset, args.source, train_limit=args.train_limit,
                                test_limit=args.test_limit, augment=recipe["augment"], verbose=False)
    say(f"Data: {data.description}")
    train = D.distributed_loader(data, batch // n, seed=args.seed)
    test = data.test
    kwargs = {}
    if args.model.startswith("vgg"):
        kwargs = {"in_channels": data.input_shape[0], "input_size": data.input_shape[1]}
    elif args.model == "lenet5":
        kwargs = {"in_channels": data.input_shape[0]}
    result = {"world_size": n, "device": str(device), "backend": backend, "model": args.model,
              "data": data.description, "global_batch": batch, "quick": quick}
    start_all = time.perf_counter()

    # 1. fp32 baseline, trained under DDP.
    torch.manual_seed(args.seed)
    model = D.wrap(build_model(args.model, num_classes=data.num_classes, **kwargs), device)
    t0 = time.perf_counter()
    history = fit(model, train, epochs, lr=recipe["lr"], optimizer=recipe["optimizer"], device=device,
                  seed=args.seed, progress=False, desc="fp32")
    teacher = D.unwrap(model).eval()
    result.update(fp32_acc=accuracy(teacher, test), fp32_epochs=epochs, fp32_seconds=time.perf_counter() - t0,
                  fp32_epoch_seconds=float(history["seconds"].mean()))
    say(f"fp32 baseline: {result['fp32_acc']:.2f}% after {epochs} epochs, "
        f"{result['fp32_epoch_seconds']:.2f} s per epoch")

    # 2. Prune and distil: the ordinary helper, on the wrapped student.
    student = D.wrap(copy.deepcopy(teacher), device)
    t0 = time.perf_counter()
    table = prune_and_distill(student, teacher, train, target=args.sparsity, steps=steps,
                              epochs_per_step=epochs_per_step, T=DISTILL_RECIPE["T"],
                              alpha=DISTILL_RECIPE["alpha"], lr=DISTILL_RECIPE["lr"], scope=DISTILL_RECIPE["scope"],
                              eval_data=test, device=device, seed=args.seed, progress=False)
    result.update(sparsity=sparsity(D.unwrap(student)), pruned_acc=float(table["acc_pruned"].iloc[-1]),
                  distilled_acc=float(table["acc_retrained"].iloc[-1]), distill_seconds=time.perf_counter() - t0)
    say(f"pruned to {result['sparsity']:.1%} in {steps} steps: {result['pruned_acc']:.2f}% right after the last "
        f"coring, {result['distilled_acc']:.2f}% after distillation")

    # 3. Quantise the plain network (calibration ranges are all-reduced), retrain it under DDP.
    t0 = time.perf_counter()
    qmodel = quant.quantise_model(D.unwrap(student), train, args.weight_bits, args.act_bits)
    result["ptq_acc"] = accuracy(qmodel, test)
    ptq_state = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}  # wrap() would copy rank 0's
    qmodel = D.wrap(qmodel, device)
    qhistory = quant.retrain(qmodel, train, qat_epochs, method="random_subset", lr=0.01, device=device,
                             seed=args.seed, progress=False)
    final = D.unwrap(qmodel)
    levels = quant.distinct_values(final)
    result.update(weight_bits=args.weight_bits, act_bits=args.act_bits, qat_epochs=qat_epochs,
                  qat_acc=accuracy(final, test), qat_seconds=time.perf_counter() - t0,
                  qat_epoch_seconds=float(qhistory["seconds"].mean()),
                  final_sparsity=float(levels["zeros"].sum() / levels["weights"].sum()),
                  max_levels_per_channel=int(levels["max_per_channel"].max()))
    say(f"{args.weight_bits}-bit weights / {args.act_bits}-bit activations: PTQ {result['ptq_acc']:.2f}%, "
        f"after random-subset retraining {result['qat_acc']:.2f}% ({qat_epochs} epochs, "
        f"{result['qat_epoch_seconds']:.2f} s per epoch)")
    say(f"final weights: {result['final_sparsity']:.1%} zeros, at most {result['max_levels_per_channel']} "
        f"distinct values per channel (the {args.weight_bits}-bit grid has "
        f"{quant.QuantSpec.for_weights(args.weight_bits).levels} levels)")

    # Do all ranks hold the same network, bit for bit?
    differing = D.differences_across_ranks(final)
    result.update(ranks_agree=not differing, differing=differing[:10])
    say(f"weights, masks and quantisation parameters identical on all {n} rank(s): "
        f"{'yes' if not differing else 'NO: ' + ', '.join(differing[:5])}")
    result["pipeline_seconds"] = time.perf_counter() - start_all
    if args.save:
        atomic_save({"pruned": D.unwrap(student).state_dict(), "ptq": ptq_state, "quantised": final.state_dict(),
                     "result": {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}},
                    os.path.join(args.save, f"rank{D.rank()}.pt"))

    # Cost of fake quantisation in a training step, fp32 against QAT (every weight quantised), under DDP.
    probe = quant.attach_quantisers(teacher, args.weight_bits, args.act_bits)
    quant.calibrate(probe, train, 1)
    for q in quant.weight_layers(probe).values():
        quant.weight_quantiser(q).track = True  # as while retraining: the grid follows the weights
    x, y = next(iter(train))
    timed = time_training_steps({"fp32": D.wrap(copy.deepcopy(teacher), device), "qat": D.wrap(probe, device)},
                         (x, y), device=device, rounds=5 if quick else 20, steps=3)
    result.update(step_seconds_fp32=timed["fp32"], step_seconds_qat=timed["qat"],
                  qat_step_ratio=timed["qat"] / timed["fp32"])
    say(f"one {'DDP ' if D.is_distributed() else ''}training step (batch {x.shape[0]} per rank): "
        f"fp32 {1e3 * timed['fp32']:.2f} ms, "
        f"QAT {1e3 * timed['qat']:.2f} ms ({result['qat_step_ratio']:.2f}x)")
    result["seconds"] = time.perf_counter() - start_all
    say(f"total {result['seconds']:.1f} s")
    D.shutdown()
    return result


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.quick:
        os.environ["NNLAB_QUICK"] = "1"
    from nnlab.distributed import launched_by_torchrun

    if args.nproc < 1:
        raise SystemExit(f"--nproc must be a positive integer, got {args.nproc}")
    if args.nproc > 1 and not launched_by_torchrun():
        status = relaunch(argv, args.nproc)
        if status:
            raise SystemExit(status)
        return None
    result = run(args)
    if args.json and result is not None and os.environ.get("RANK", "0") == "0":
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
