"""nnlab's helpers on CUDA tensors: coring, gradual schedules, distillation, L1, calibration, QAT, sensitivity.

Every test runs twice: on the CPU (so CI, which has no GPU, exercises the
checks themselves) and on ``cuda``, marked ``gpu``: run when a CUDA device is
present, skipped otherwise (see conftest.py).  The last test runs the
distributed example on the GPUs with nccl.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnlab import distributed as D
from nnlab import quant
from nnlab.distill import distill, prune_and_distill
from nnlab.models import LeNet5, VGGSmall
from nnlab.prune import (GradualCoring, core_by_fraction, core_by_threshold, core_channels, effective_weight,
                         prunable_layers, sensitivity_analysis, sparsity)
from nnlab.regularise import l1_penalty
from nnlab.train import accuracy, fit

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ROOT = Path(__file__).resolve().parents[1]


def _trained(tiny_data, device, epochs=2):
    torch.manual_seed(0)
    net = LeNet5()
    fit(net, tiny_data, epochs, optimizer="adam", lr=3e-3, device=device, progress=False)
    return net


def _zeros_stay_zero(model):
    for _, m in prunable_layers(model):
        assert m.weight_mask.device == m.weight_orig.device
        assert torch.all(effective_weight(m)[m.weight_mask == 0] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_coring_and_gradual_schedule(tiny_data, device):
    torch.manual_seed(0)
    net = LeNet5().to(device)
    core_by_threshold(net, 0.5, scope="layer")
    core_by_fraction(net, 0.5, scope="global")
    core_channels(net, 0.25, layers=["conv1"])
    assert net[0].weight_mask.device.type == device
    assert sparsity(net) >= 0.5
    fit(net, tiny_data, 2, device=device, progress=False, callbacks=[GradualCoring(0.8, every=2, end=0.5)])
    assert sparsity(net) == pytest.approx(0.8, abs=1e-3)
    _zeros_stay_zero(net)
    assert net(torch.zeros(2, 1, 28, 28, device=device)).device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_distillation_with_l1(tiny_data, device):
    teacher = _trained(tiny_data, device)
    student = copy.deepcopy(teacher)
    core_by_fraction(student, 0.7)
    history = distill(student, teacher, tiny_data, 1, device=device, progress=False, penalty=l1_penalty(1e-4))
    assert history["loss"].notna().all()
    _zeros_stay_zero(student)
    table = prune_and_distill(student, teacher, tiny_data, sparsities=[0.8], epochs_per_step=1, device=device,
                              progress=False)
    assert table["sparsity"].iloc[-1] == pytest.approx(0.8, abs=1e-3)
    assert 0 <= table["acc_retrained"].iloc[-1] <= 100
    _zeros_stay_zero(student)


@pytest.mark.parametrize("device", DEVICES)
def test_sensitivity_analysis(tiny_data, device):
    net = _trained(tiny_data, device, epochs=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    table = sensitivity_analysis(net, tiny_data, sparsities=(0.0, 0.9), layers=["conv1", "fc1"], device=device)
    assert len(table) == 4 and table["accuracy"].between(0, 100).all()
    dense = table[table["sparsity"] == 0.0]["accuracy"]
    assert dense.tolist() == pytest.approx([accuracy(net, tiny_data)] * 2, abs=1.0)  # coring nothing changes nothing
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model is left alone


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["ste", "random_subset"])
def test_calibration_and_retraining(tiny_data, device, method):
    net = _trained(tiny_data, device)
    core_by_fraction(net, 0.6)
    q = quant.quantise_model(net, tiny_data, 4, 8, device=device)
    for name, a in quant.act_quantisers(q).items():
        assert a.scale.device.type == device and a.scale.item() > 0, name
    acc_ptq = accuracy(q, tiny_data)
    acc_cpu = accuracy(copy.deepcopy(q).to("cpu"), tiny_data)
    assert abs(acc_ptq - acc_cpu) <= 2.0  # the same grids give (nearly) the same predictions anywhere
    quant.retrain(q, tiny_data, 1, method=method, lr=0.01, device=device, progress=False)
    for layer in quant.weight_layers(q).values():
        wq = quant.weight_quantiser(layer)
        assert wq.scale.device.type == device
        if method == "random_subset":
            assert wq.priority.device.type == device
        codes, spec, _, _ = quant.quantised_weight(layer)
        assert codes.min() >= spec.quant_min and codes.max() <= spec.quant_max
        mask = layer.parametrizations.weight[0].mask
        assert torch.all(layer.weight[mask == 0] == 0)  # pruned zeros stay zero
    assert quant.distinct_values(q)["max_per_channel"].max() <= 15  # the 4-bit narrow grid


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_network_and_generator(tiny_data, device):
    torch.manual_seed(0)
    vgg = VGGSmall(in_channels=1, input_size=28, width=4)
    fit(vgg, tiny_data, 1, device=device, progress=False, callbacks=[GradualCoring(0.5, every=2)])
    q = quant.quantise_model(vgg, tiny_data, 6, 8, overrides={"conv1": 8}, device=device)
    quant.retrain(q, tiny_data, 1, lr=0.01, device=device, progress=False)
    bits = {name: quant.weight_quantiser(layer).spec.bits for name, layer in quant.weight_layers(q).items()}
    assert bits.pop("conv1") == 8 and set(bits.values()) == {6}, bits  # the override survived retraining
    assert 0 <= accuracy(q, tiny_data, device=device) <= 100
    draws = [torch.rand(3, generator=D.shared_generator(11, device), device=device) for _ in range(2)]
    assert draws[0].device.type == device and torch.equal(draws[0], draws[1])


@pytest.mark.gpu
@pytest.mark.slow
def test_distributed_example_on_gpus(tmp_path):
    """benchmarks/ddp.py on up to 2 GPUs with nccl: the ranks agree bit for bit (1 GPU: a group of one)."""
    from test_ddp import EXAMPLE, EXAMPLE_ARGS, _check_pruned_and_quantised

    n = min(2, torch.cuda.device_count())
    args = [a if a != "cpu" else "cuda" for a in EXAMPLE_ARGS]
    env = {**os.environ, "NNLAB_QUICK": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(EXAMPLE),
           "--json", "--save", str(tmp_path), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "nccl" and result["device"].startswith("cuda") and result["ranks_agree"]
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(n)]
    for other in saved[1:]:
        for stage in ("pruned", "ptq", "quantised"):
            for key, value in saved[0][stage].items():
                assert torch.equal(value, other[stage][key]), f"{stage} {key} differs"
    _check_pruned_and_quantised(saved[0]["quantised"])
