"""Self-checks for the notebooks' exercises.

Each exercise asks the student to write one small function; the check right
after it calls that function on known inputs and compares the answer with
nnlab's own implementation (or PyTorch's), then prints one line:

* ``PASS``: every case agrees;
* ``FAIL``: the first case that disagrees, what was expected, and a hint;
* ``NOT YET``: the function still raises ``NotImplementedError``, so an
  unsolved notebook runs on to the end.

Every check returns a :class:`CheckResult` (true when passed).  With the
environment variable ``NNLAB_REQUIRE_CHECKS=1`` a check that does not pass
raises ``AssertionError`` instead: the tests run the notebooks with the
solutions filled in that way, so a wrong solution, or a check that rejects a
right one, fails CI.

Solutions live in ``notebooks/solutions/`` and load into a cell with
``%load solutions/<file>.py``.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

from .models import LeNet5, LeNet300100
from .nna.packing import pack

__all__ = ["CheckResult", "fraction_coring", "distillation_loss", "l1_penalty", "fake_quantiser",
           "nearest_level", "pack_bits", "EXERCISES"]


@dataclass
class CheckResult:
    """Outcome of one self-check: ``status`` is ``"pass"``, ``"fail"`` or ``"not yet"``."""

    name: str
    status: str
    message: str

    def __bool__(self):
        return self.status == "pass"

    def __repr__(self):
        return f"CheckResult({self.name!r}, {self.status!r})"


def _run(name: str, fn: Callable, cases, hint: str) -> CheckResult:
    """Run ``fn`` on each case; a case is ``(description, args, expected, compare)``."""
    if not callable(fn):
        raise TypeError(f"pass your function itself to the check, got {fn!r}")
    for description, args, expected, compare in cases:
        try:
            got = fn(*args)
        except NotImplementedError:
            return _finish(CheckResult(name, "not yet",
                                       f"NOT YET  {name}: replace `raise NotImplementedError` with your code, "
                                       f"or load the solution with %load."))
        except Exception as exc:  # the student's code crashed: say how, do not crash the notebook
            return _finish(CheckResult(name, "fail", f"FAIL  {name}: {description}: your function raised "
                                                     f"{type(exc).__name__}: {exc}\n      hint: {hint}"))
        try:
            ok, detail = compare(got, expected)
        except Exception as exc:  # an answer of a shape or type no comparison foresaw: a FAIL, never a crash
            ok, detail = False, (f"your function returned {_describe(got)}, which cannot be compared with the "
                                 f"expected answer ({type(exc).__name__}: {exc})")
        if not ok:
            return _finish(CheckResult(name, "fail", f"FAIL  {name}: {description}: {detail}\n      hint: {hint}"))
    return _finish(CheckResult(name, "pass", f"PASS  {name}: all {len(cases)} cases agree."))


def _finish(result: CheckResult) -> CheckResult:
    print(result.message)
    if result.status != "pass" and os.environ.get("NNLAB_REQUIRE_CHECKS", "").lower() not in ("", "0", "false"):
        raise AssertionError(result.message)
    return result


def _describe(value) -> str:
    """A short description of a student's answer, e.g. ``a list of 3 items`` or ``a float32 tensor of shape (4,)``."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a NumPy {value.dtype} array of shape {value.shape}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    if value is None:
        return "None (did you forget `return`?)"
    return f"a value of type {type(value).__name__} ({str(value)[:40]!r})"


def _non_finite(got: torch.Tensor, expected: torch.Tensor):
    """A failure message when ``got`` has NaN or infinite entries where ``expected`` is finite, else None."""
    if not (got.is_floating_point() or got.is_complex()):
        return None
    bad = ~torch.isfinite(got) & torch.isfinite(expected)
    if not bad.any():
        return None
    i = int(bad.flatten().nonzero()[0])
    return (f"{int(bad.sum())} of {expected.numel()} entries are NaN or infinite (e.g. entry {i}: "
            f"{got.flatten()[i].item()}, expected {expected.flatten()[i].item():.6g}); look for a division by "
            f"zero, 0 * inf, or a log or sqrt of a value out of range")


def _same_tensor(got, expected, atol=0.0):
    if not isinstance(got, torch.Tensor):
        return False, f"expected a torch.Tensor, got {_describe(got)}"
    if tuple(got.shape) != tuple(expected.shape):
        return False, f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    if got.is_complex() and not expected.is_complex():
        return False, f"expected a real tensor ({expected.dtype}), got {got.dtype}"
    got = got.detach().cpu()
    if got.dtype != expected.dtype:
        got = got.to(expected.dtype)
    problem = _non_finite(got, expected)
    if problem:
        return False, problem
    if atol == 0.0:
        bad = (got != expected)
    else:
        bad = ~((got - expected).abs() <= atol)  # NaN counts as a difference
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        return False, (f"{int(bad.sum())} of {expected.numel()} entries differ; e.g. entry {i}: expected "
                       f"{expected.flatten()[i].item():.6g}, got {got.flatten()[i].item():.6g}")
    return True, ""


def _close_scalar(got, expected, rtol=1e-5):
    try:
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                raise ValueError
            value = float(got.detach().cpu().reshape(()))
        elif isinstance(got, (numbers.Real, np.ndarray)) and not isinstance(got, bool):
            value = float(got)
        else:  # a string, a list, None ...: not a number, even if float() could read it
            raise TypeError
    except Exception:
        return False, f"expected a number (or a 0-dim tensor), got {_describe(got)}"
    expected = float(expected.detach()) if isinstance(expected, torch.Tensor) else float(expected)
    if not np.isfinite(value):
        return False, (f"expected {expected:.6f}, got {value}: look for a division by zero, 0 * inf, or a log of "
                       f"zero (softmax then log instead of log_softmax?)")
    if not np.isclose(value, expected, rtol=rtol, atol=1e-7):
        return False, f"expected {expected:.6f}, got {value:.6f}"
    return True, ""


# -- notebook 01: fraction coring --------------------------------------------------

def _torch_fraction_mask(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    holder = nn.Linear(1, 1, bias=False)
    holder.weight = nn.Parameter(weight.clone())
    torch_prune.l1_unstructured(holder, "weight", amount=fraction)
    return holder.weight_mask.clone()


def fraction_coring(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> CheckResult:
    """Check ``fn(weight, fraction) -> mask``: 0 for the smallest ``fraction`` of |weight|, 1 elsewhere.

    The expected masks are those of ``torch.nn.utils.prune.l1_unstructured``
    (which prunes ``round(fraction * n)`` weights) on tensors without ties.
    """
    g = torch.Generator().manual_seed(1)
    cases = []
    for shape, fraction in (((6, 5), 0.5), ((4, 3, 3), 0.3), ((10,), 0.0), ((7, 7), 0.9), ((3, 4), 1.0),
                            ((5, 5), 0.25)):
        w = torch.randn(shape, generator=g)
        cases.append((f"weight of shape {shape}, fraction={fraction}", (w.clone(), fraction),
                      _torch_fraction_mask(w, fraction), _same_tensor))
    return _run("fraction coring", fn, cases,
                "prune k = round(fraction * weight.numel()) weights: the k smallest |w| get mask 0 "
                "(torch.topk(w.abs().flatten(), k, largest=False) finds them); return a tensor shaped like weight.")


# -- notebook 02: the distillation loss ------------------------------------------------

def _reference_distillation_loss(student, teacher, labels, T, alpha):
    soft = F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction="batchmean")
    return alpha * T * T * soft + (1 - alpha) * F.cross_entropy(student, labels)


def distillation_loss(fn: Callable) -> CheckResult:
    """Check ``fn(student_logits, teacher_logits, labels, T, alpha) -> scalar``.

    Convention (as :func:`nnlab.distill.distillation_loss`):
    ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)``,
    the KL divergence averaged over the batch.
    """
    g = torch.Generator().manual_seed(2)
    cases = []
    for n, T, alpha in ((8, 1.0, 0.5), (16, 4.0, 0.9), (5, 2.0, 1.0), (12, 3.0, 0.0)):
        s, t = torch.randn(n, 10, generator=g) * 3, torch.randn(n, 10, generator=g) * 3
        y = torch.randint(0, 10, (n,), generator=g)
        cases.append((f"batch of {n}, T={T}, alpha={alpha}", (s, t, y, T, alpha),
                      _reference_distillation_loss(s, t, y, T, alpha), _close_scalar))
    return _run("distillation loss", fn, cases,
                "F.kl_div expects log-probabilities of the student and probabilities of the teacher, "
                "reduction='batchmean'; soften both with /T, multiply the soft term by T*T.")


# -- notebook 03: the L1 penalty ------------------------------------------------------

def l1_penalty(fn: Callable[[nn.Module, float], torch.Tensor]) -> CheckResult:
    """Check ``fn(model, strength) -> strength * sum of |w|`` over every Conv2d and Linear weight (not biases)."""
    cases = []
    for builder, strength in ((LeNet5, 1e-4), (LeNet300100, 1e-3), (LeNet5, 0.5)):
        torch.manual_seed(3)
        model = builder()
        expected = strength * sum(m.weight.abs().sum() for m in model.modules()
                                  if isinstance(m, (nn.Conv2d, nn.Linear)))
        cases.append((f"{builder.__name__}, strength={strength}", (model, strength), expected, _close_scalar))
    return _run("L1 penalty", fn, cases,
                "loop over model.modules(), keep isinstance(m, (nn.Conv2d, nn.Linear)), add m.weight.abs().sum(); "
                "biases are not penalised.")


# -- notebook 04: the fake quantiser -------------------------------------------------

def fake_quantiser(fn: Callable) -> CheckResult:
    """Check ``fn(x, scale, zero_point, quant_min, quant_max) -> x_hat`` against PyTorch's fake quantisation.

    ``q = clamp(round(x / scale) + zero_point, quant_min, quant_max)`` with
    rounding half to even, then ``x_hat = (q - zero_point) * scale``; the
    cases include ties (x exactly halfway between two levels).
    """
    g = torch.Generator().manual_seed(4)
    cases = []
    for bits, signed, scale, zp in ((8, True, 0.05, 0), (4, True, 0.25, 0), (5, False, 0.1, 7), (3, False, 0.5, 2)):
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        x = torch.randn(200, generator=g) * scale * 2 ** (bits - 1)
        ties = (torch.arange(-6, 6, dtype=torch.float32) + 0.5) * scale  # exactly halfway between levels
        x = torch.cat([x, ties])
        expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        cases.append((f"{bits}-bit {'signed' if signed else 'unsigned'}, scale={scale}, zero_point={zp}",
                      (x.clone(), scale, zp, qmin, qmax), expected, lambda a, b: _same_tensor(a, b, atol=1e-6)))
    return _run("fake quantiser", fn, cases,
                "torch.round rounds half to even, like PyTorch's quantiser; clamp the integer code "
                "to [quant_min, quant_max] before you scale it back.")


# -- notebook 05: clamping to the nearest level ---------------------------------------

def nearest_level(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> CheckResult:
    """Check ``fn(weights, levels) -> weights`` with every entry moved to its nearest level (ties: lower level).

    This is the final clamping step of random-subset retraining.
    """
    g = torch.Generator().manual_seed(5)
    cases = []
    for bits in (2, 3, 5):
        n = 2 ** bits - 1
        levels = torch.linspace(-1, 1, n)
        w = torch.randn(9, 7, generator=g) * 0.6
        idx = (w.unsqueeze(-1) - levels).abs().argmin(-1)  # argmin takes the first (lower) level on ties
        cases.append((f"{n} levels between -1 and 1", (w.clone(), levels.clone()), levels[idx],
                      lambda a, b: _same_tensor(a, b, atol=1e-7)))
    return _run("nearest level", fn, cases,
                "(weights.unsqueeze(-1) - levels).abs() gives the distance of every weight to every level; "
                "argmin over the last dimension picks the nearest.")


# -- notebook 06: packing low-bit values -----------------------------------------------

def _reference_pack(values: np.ndarray, bits: int) -> bytes:
    return bytes(pack(np.asarray(values), bits, signed=False))


def pack_bits(fn: Callable[[np.ndarray, int], bytes]) -> CheckResult:
    """Check ``fn(values, bits) -> bytes``: unsigned ``values`` packed as a dense little-endian bitstream.

    Value ``i`` occupies bits ``i*bits ... i*bits + bits - 1`` of the stream,
    least significant bit first, bit 0 of the stream being bit 0 of byte 0;
    the last byte is padded with zeros.  This is :func:`nnlab.nna.packing.pack`.
    """
    rng = np.random.default_rng(6)
    cases = []
    for bits, n in ((5, 8), (5, 13), (3, 10), (4, 7), (7, 9)):
        values = rng.integers(0, 2 ** bits, n)
        cases.append((f"{n} values of {bits} bits", (values.copy(), bits), _reference_pack(values, bits),
                      _same_bytes))
    return _run("pack bits", fn, cases,
                "walk the values, OR each one into an integer accumulator shifted by the bits used so far; "
                "emit a byte whenever 8 bits are full, and the remainder at the end.")


def _same_bytes(got, expected):
    if got is None or isinstance(got, (str, numbers.Number)):  # bytes(5) would be five zero bytes
        return False, f"expected bytes (or a bytearray), got {_describe(got)}"
    try:
        got = bytes(got)
    except Exception as exc:  # e.g. [300]: a value that does not fit in a byte
        return False, (f"expected bytes, got {_describe(got)} that is not a sequence of bytes 0..255 "
                       f"({type(exc).__name__}: {exc})")
    if len(got) != len(expected):
        return False, f"expected {len(expected)} bytes, got {len(got)}"
    if got != expected:
        i = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        return False, f"byte {i}: expected {expected[i]:08b}, got {got[i]:08b}"
    return True, ""


#: Exercise name -> (notebook, function name the student writes, check, solution file).
EXERCISES = {
    "fraction_coring": ("01", "core_by_fraction_mask", fraction_coring, "01_fraction_coring.py"),
    "distillation_loss": ("02", "my_distillation_loss", distillation_loss, "02_distillation_loss.py"),
    "l1_penalty": ("03", "my_l1_penalty", l1_penalty, "03_l1_penalty.py"),
    "fake_quantiser": ("04", "my_fake_quantise", fake_quantiser, "04_fake_quantiser.py"),
    "nearest_level": ("05", "clamp_to_nearest_level", nearest_level, "05_nearest_level.py"),
    "pack_bits": ("06", "pack_values", pack_bits, "06_pack_bits.py"),
}
