"""Scaling up: nnlab's helpers under DistributedDataParallel, with 2 CPU processes talking through gloo.

* helpers outside a process group behave as one ordinary process;
* a 2-rank gloo group (torch.multiprocessing.spawn) checks the collectives,
  calibration, random subsets, pruning inside ``fit`` and batch norm;
* the distributed example (benchmarks/ddp.py) runs under torchrun with 2
  processes, and the two ranks' final weights, masks and quantisation
  parameters are compared bit for bit; zeros stay zero and the bit-depth
  limits hold exactly as in the same run on one process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nnlab import distributed as D
from nnlab import quant
from nnlab.data import load_data
from nnlab.models import LeNet5, VGGSmall
from nnlab.prune import GradualCoring, core_by_fraction, effective_weight, prunable_layers
from nnlab.train import Callback, fit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "benchmarks" / "ddp.py"
# Small and quick: the point is agreement between ranks, not accuracy.
EXAMPLE_ARGS = ["--device", "cpu", "--train-limit", "480", "--test-limit", "200", "--batch-size", "32",
                "--epochs", "1", "--steps", "2", "--epochs-per-step", "1", "--qat-epochs", "1",
                "--sparsity", "0.9", "--weight-bits", "4", "--act-bits", "8"]


@pytest.fixture(scope="module")
def small_data():
    return load_data(train_limit=200, test_limit=100, verbose=False)


# ---------------------------------------------------------------------------
# One process: the helpers are harmless no-ops or ordinary loaders
# ---------------------------------------------------------------------------

def test_single_process_defaults():
    assert not D.is_distributed()
    assert (D.rank(), D.world_size(), D.is_main_process()) == (0, 1, True)
    net = LeNet5()
    assert D.wrap(net, "cpu") is net and D.unwrap(net) is net
    lo, hi = torch.tensor(-1.0), torch.tensor(2.0)
    assert D.all_reduce_min_max(lo, hi) == (lo, hi) and lo.item() == -1.0
    assert D.broadcast_model_state(net) is net
    assert D.differences_across_ranks(net) == []
    digest = D.state_digest(net)
    assert set(digest) == set(net.state_dict())
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-7
    assert D.state_digest(net)["conv1.weight"] != digest["conv1.weight"]  # one changed bit changes the digest
    assert D.state_digest(net)["conv1.bias"] == digest["conv1.bias"]


def test_distributed_loader_splits_the_data(small_data):
    ds = small_data.train.dataset
    seen = []
    for r in range(3):
        loader = D.distributed_loader(small_data, 16, seed=5, num_replicas=3, rank=r)
        assert loader.dataset is ds
        batches = list(loader.batch_sampler if loader.batch_sampler is not None else loader.sampler)
        assert len(loader) == len(batches) == 5  # ceil(200 / 3) = 67 images per rank
        seen.append([i for b in batches for i in b])
    assert all(len(s) == 67 for s in seen)
    assert set().union(*map(set, seen)) == set(range(len(ds)))  # together the ranks see every image
    again = D.distributed_loader(small_data, 16, seed=5, num_replicas=3, rank=0)
    assert [i for b in again.sampler for i in b] == seen[0]  # the same shuffle for the same seed and epoch
    again.sampler.sampler.set_epoch(1)
    assert [i for b in again.sampler for i in b] != seen[0]  # and another one next epoch
    # Outside a process group it is one shuffled loader of everything, usable by fit.
    whole = D.distributed_loader(small_data.train, 50, seed=0)
    assert sum(len(y) for _, y in whole) == 200
    torch.manual_seed(0)
    history = fit(LeNet5(), whole, 2, progress=False)
    assert len(history) == 2


def test_bad_arguments(small_data):
    with pytest.raises(ValueError, match="batch_size"):
        D.distributed_loader(small_data, 0)
    with pytest.raises(ValueError, match="rank"):
        D.distributed_loader(small_data, 8, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="dataset"):
        D.distributed_loader([1, 2, 3], 8)
    with pytest.raises(ValueError, match="seed"):
        D.shared_generator(-1)
    with pytest.raises(ValueError, match="backend"):
        D.init_distributed("cpu", backend="mpi")
    with pytest.raises(ValueError, match="src"):
        D.broadcast_model_state(LeNet5(), src=1)
    with pytest.raises(TypeError, match="model"):
        D.wrap("lenet5")
    with pytest.raises(ValueError, match="keys"):
        D.differences_across_ranks(LeNet5(), keys=["nope"])


def test_init_outside_torchrun_initialises_nothing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed("cpu") == torch.device("cpu")
    assert not D.is_distributed()
    D.shutdown()  # nothing to leave


def test_random_subsets_do_not_depend_on_the_global_generator():
    def priorities(global_seed):
        torch.manual_seed(0)
        net = quant.attach_quantisers(nn.Sequential(nn.Linear(20, 10)), 4, None)
        torch.manual_seed(global_seed)  # what augmentation or dropout may have left behind
        callback = quant.RandomSubset(seed=3)
        callback.on_step_start(0, 10, net)
        before = torch.random.get_rng_state()
        callback.on_step_start(1, 10, net)
        assert torch.equal(before, torch.random.get_rng_state())  # the global generator is untouched
        return quant.weight_quantiser(net[0]).priority.clone()

    assert torch.equal(priorities(1), priorities(2))
    assert torch.equal(torch.rand(5, generator=D.shared_generator(7)), torch.rand(5, generator=D.shared_generator(7)))


# ---------------------------------------------------------------------------
# Two ranks (gloo on the CPU), started by torch.multiprocessing.spawn
# ---------------------------------------------------------------------------

def _gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _two_rank_checks(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        assert D.is_distributed() and D.rank() == rank and D.world_size() == 2

        # Collectives: every rank gets the global min / max / sum.
        lo, hi = torch.tensor(-1.0 - rank), torch.tensor(3.0 * rank)
        D.all_reduce_min_max(lo, hi)
        assert (lo.item(), hi.item()) == (-2.0, 3.0)
        (total,) = D.all_reduce_sum(torch.tensor([rank + 1.0]))
        assert total.item() == 3.0

        # A generator without a seed: rank 0 picks one, every rank draws the same numbers.
        draws = _gather(torch.rand(4, generator=D.shared_generator(None)).tolist())
        assert draws[0] == draws[1]

        # Wrapping copies rank 0's weights; broadcast_model_state copies buffers and masks too.
        data = load_data(train_limit=128, test_limit=64, verbose=False)
        torch.manual_seed(rank)  # deliberately different on each rank
        plain = LeNet5()
        before = D.differences_across_ranks(plain)
        assert "conv1.weight" in before
        model = D.wrap(plain)
        assert isinstance(model, nn.parallel.DistributedDataParallel) and D.unwrap(model) is plain
        assert D.differences_across_ranks(model) == []
        core_by_fraction(plain, 0.3 + 0.2 * rank)  # different masks on purpose ...
        assert D.differences_across_ranks(plain) != []
        D.broadcast_model_state(plain)  # ... until rank 0's are sent to everyone
        assert D.differences_across_ranks(plain) == []

        # Calibration: each rank sees its own images; the ranges are combined.
        loader = D.distributed_loader(data, 16, seed=0)
        for method in ("max", "percentile"):
            local = quant.attach_quantisers(plain, 8, 8, act_method=method)
            quant.calibrate(local, loader, 2, sync_ranks=False)
            synced = quant.attach_quantisers(plain, 8, 8, act_method=method)
            quant.calibrate(synced, loader, 2)
            mine = {n: (q.lo.item(), q.hi.item()) for n, q in quant.act_quantisers(local).items()}
            everyone = _gather(mine)
            assert everyone[0] != everyone[1]  # the ranks really saw different images
            for name, q in quant.act_quantisers(synced).items():
                los, his = [e[name][0] for e in everyone], [e[name][1] for e in everyone]
                if method == "max":
                    assert (q.lo.item(), q.hi.item()) == (min(los), max(his))
                else:  # mean over all batches of every rank (each saw 2)
                    assert q.lo.item() == pytest.approx(sum(los) / 2, rel=1e-5)
                    assert q.hi.item() == pytest.approx(sum(his) / 2, rel=1e-5)
                assert q.batches.item() == 4
            assert D.differences_across_ranks(synced) == []

        # Random-subset retraining: every rank quantises the same subset, whatever its global RNG.
        qmodel = D.wrap(quant.quantise_model(plain, loader, 3, 8))
        torch.manual_seed(100 + rank)
        callback = quant.RandomSubset(seed=1)
        callback.on_step_start(0, 10, qmodel)
        prios = _gather([quant.weight_quantiser(m).priority.sum().item()
                         for m in quant.weight_layers(qmodel).values()])
        assert prios[0] == prios[1]
        quant.retrain(qmodel, loader, 1, method="random_subset", lr=0.01, progress=False)
        prios = _gather([quant.weight_quantiser(m).priority.sum().item()
                         for m in quant.weight_layers(qmodel).values()])
        assert prios[0] == prios[1]  # the last subset drawn, too
        assert D.differences_across_ranks(qmodel) == []

        # Gradual pruning inside fit on a wrapped model with batch norm: masks, weights and
        # running statistics end identical, and pruned weights are exactly zero.
        torch.manual_seed(rank)
        vgg = D.wrap(VGGSmall(in_channels=1, input_size=28, width=4))
        last_grads = {}

        class KeepLastGradients(Callback):  # fit drops the gradients when it returns
            def on_step_end(self, step, total, model):
                if step == total - 1:
                    last_grads.update({n: m.weight_orig.grad.clone() for n, m in prunable_layers(D.unwrap(model))})

        fit(vgg, loader, 2, lr=0.05, progress=False,
            callbacks=[GradualCoring(0.7, every=2, end=0.5), KeepLastGradients()])
        assert D.differences_across_ranks(vgg) == []
        assert last_grads
        for name, m in prunable_layers(D.unwrap(vgg)):
            assert torch.all(effective_weight(m)[m.weight_mask == 0] == 0)
            assert torch.all(last_grads[name][m.weight_mask == 0] == 0)
        bn = D.unwrap(vgg)[1]
        assert bn.num_batches_tracked.item() > 0
    finally:
        dist.destroy_process_group()


def test_two_ranks_stay_identical(tmp_path):
    mp.spawn(_two_rank_checks, args=(str(tmp_path / "store"),), nprocs=2, join=True)


# ---------------------------------------------------------------------------
# The distributed example: torchrun with 2 CPU processes, against one process
# ---------------------------------------------------------------------------

def _load_example():
    spec = importlib.util.spec_from_file_location("nnlab_ddp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_pruned_and_quantised(state, bits=4, sparsity=0.9):
    """Zeros stay zero and at most the grid's levels per channel; returns the number of masked weights."""
    masked = 0
    layers = sorted({k.split(".parametrizations")[0] for k in state if ".parametrizations.weight" in k})
    assert layers, "no quantised layer in the saved state"
    levels = quant.QuantSpec.for_weights(bits).levels
    for name in layers:
        w = state[f"{name}.parametrizations.weight.original"]
        mask = state[f"{name}.parametrizations.weight.0.mask"]
        scale = state[f"{name}.parametrizations.weight.1.scale"]
        assert torch.all(w[mask == 0] == 0)  # pruned weights are exactly zero
        codes = w / scale.view(-1, *[1] * (w.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # every weight lies on its channel's grid
        assert codes.round().abs().max() <= 2 ** (bits - 1) - 1
        for row in w.reshape(w.shape[0], -1):
            assert len(torch.unique(row)) <= levels
        masked += int((mask == 0).sum())
    total = sum(state[f"{n}.parametrizations.weight.original"].numel() for n in layers)
    assert masked == round(sparsity * total)  # global fraction coring: exactly this many
    return masked


@pytest.mark.slow
def test_distributed_example_two_cpu_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("NNLAB_QUICK", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    env = {**os.environ, "NNLAB_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           "--json", "--save", str(tmp_path / "ddp"), *EXAMPLE_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["ranks_agree"] and result["differing"] == []
    for key in ("fp32_acc", "distilled_acc", "ptq_acc", "qat_acc", "fp32_epoch_seconds", "qat_step_ratio"):
        assert result[key] > 0, key

    # The two ranks' files, compared bit for bit.
    saved = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for stage in ("pruned", "ptq", "quantised"):
        a, b = saved[0][stage], saved[1][stage]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{stage} {key} differs"
    quantised = saved[0]["quantised"]
    assert any(k.endswith(".weight.0.mask") for k in quantised)  # masks
    assert any(k.endswith("_quant.scale") for k in quantised)  # activation grids
    assert any(k.endswith(".weight.1.zero_point") for k in quantised)  # weight grids
    assert any(k.endswith(".weight_mask") for k in saved[0]["pruned"])
    masked_ddp = _check_pruned_and_quantised(quantised)

    # The same run as one ordinary process: the same guarantees, the same number of pruned weights.
    monkeypatch.setenv("NNLAB_THREADS", "1")  # the example then leaves this process's threads alone
    one = _load_example().main(["--nproc", "1", "--save", str(tmp_path / "one"), *EXAMPLE_ARGS])
    assert one["world_size"] == 1 and one["ranks_agree"]
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)["quantised"]
    assert single.keys() == quantised.keys()
    assert _check_pruned_and_quantised(single) == masked_ddp
    assert one["max_levels_per_channel"] <= 15 and result["max_levels_per_channel"] <= 15


def test_prune_sees_the_plain_names_inside_a_ddp_wrapper(tmp_path):
    """Coring, the sparsity report and L1 name layers as in the plain model, wrapped or not."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nnlab import prune
    from nnlab.models import LeNet5
    from nnlab.regularise import l1_penalty

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        wrapped = DistributedDataParallel(LeNet5())
        assert [n for n, _ in prune.prunable_layers(wrapped)] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
        prune.core_by_fraction(wrapped, 0.5, scope="layer", layers=["fc1"])
        report = prune.sparsity_report(wrapped)
        assert "fc1" in set(report["layer"]) and not any(str(n).startswith("module.") for n in report["layer"])
        assert abs(float((wrapped.module[7].weight == 0).float().mean()) - 0.5) < 1e-3
        assert l1_penalty(1.0, layers=["conv1"])(wrapped) > 0
    finally:
        dist.destroy_process_group()
