"""Each exercise's self-check passes on the provided solution and fails on a wrong one."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnlab import checks

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"


def load_solution(filename, name):
    namespace = {}
    exec(compile((SOLUTIONS / filename).read_text(), filename, "exec"), namespace)
    return namespace[name]


# Deliberately wrong answers: each makes one mistake a student might make.
def wrong_fraction(weight, fraction):  # prunes the largest weights instead of the smallest
    k = round(fraction * weight.numel())
    mask = torch.ones_like(weight)
    if k:
        mask.view(-1)[torch.topk(weight.abs().flatten(), k).indices] = 0
    return mask


def wrong_distillation(s, t, y, T, alpha):  # forgets the T^2 factor
    soft = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, y)


def wrong_l1(model, strength):  # penalises the biases too
    return strength * sum(p.abs().sum() for p in model.parameters())


def wrong_quantiser(x, scale, zp, qmin, qmax):  # rounds half away from zero
    q = torch.clamp(torch.sign(x / scale) * torch.floor((x / scale).abs() + 0.5) + zp, qmin, qmax)
    return (q - zp) * scale


def wrong_nearest(w, levels):  # truncates towards the lower level
    idx = torch.searchsorted(levels, w.contiguous()).clamp(1, len(levels) - 1) - 1
    return levels[idx]


def wrong_pack(values, bits):  # most significant bit first
    bitstring = "".join(format(int(v), f"0{bits}b") for v in values)
    bitstring += "0" * (-len(bitstring) % 8)
    return bytes(int(bitstring[i:i + 8], 2) for i in range(0, len(bitstring), 8))


WRONG = {"fraction_coring": wrong_fraction, "distillation_loss": wrong_distillation, "l1_penalty": wrong_l1,
         "fake_quantiser": wrong_quantiser, "nearest_level": wrong_nearest, "pack_bits": wrong_pack}


@pytest.mark.parametrize("exercise", list(checks.EXERCISES))
def test_solution_passes(exercise, capsys):
    _, fname, check, solution = checks.EXERCISES[exercise]
    result = check(load_solution(solution, fname))
    assert result and result.status == "pass", result.message
    assert capsys.readouterr().out.startswith("PASS")


@pytest.mark.parametrize("exercise", list(checks.EXERCISES))
def test_wrong_answer_fails_with_a_hint(exercise, capsys):
    check = checks.EXERCISES[exercise][2]
    result = check(WRONG[exercise])
    assert not result and result.status == "fail"
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "hint:" in out


@pytest.mark.parametrize("exercise", list(checks.EXERCISES))
def test_unsolved_exercise_says_not_yet_without_crashing(exercise, capsys):
    def unsolved(*args):
        raise NotImplementedError

    result = checks.EXERCISES[exercise][2](unsolved)
    assert result.status == "not yet" and capsys.readouterr().out.startswith("NOT YET")


def test_crashing_answer_is_reported_not_raised(capsys):
    result = checks.fraction_coring(lambda w, f: w.nonexistent())
    assert result.status == "fail" and "AttributeError" in result.message


def test_require_checks_turns_failure_into_an_error(monkeypatch):
    monkeypatch.setenv("NNLAB_REQUIRE_CHECKS", "1")
    with pytest.raises(AssertionError, match="FAIL  fraction coring"):
        checks.fraction_coring(wrong_fraction)
    with pytest.raises(AssertionError, match="NOT YET"):
        checks.fake_quantiser(lambda *a: (_ for _ in ()).throw(NotImplementedError()))


def test_distillation_convention_matches_nnlab():
    from nnlab.distill import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    ours = distillation_loss(s, t, y, T=3.0, alpha=0.7)
    assert torch.allclose(ours, checks._reference_distillation_loss(s, t, y, 3.0, 0.7))
