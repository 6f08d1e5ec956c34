"""``Grid``: one value for a quantisation grid, from training to the accelerator.

A :class:`~nnlab.quant.spec.QuantSpec` says *which* integers a tensor may
hold; a grid adds *where* they lie on the real line: ``scale`` and
``zero_point``.  The integer ``q`` stands for the real value
``(q - zero_point) * scale``.

The same frozen value travels the whole way: a quantiser returns it
(:meth:`nnlab.quant.WeightQuantiser.grid`, :meth:`nnlab.quant.ActQuantiser.grid`),
the NNA compiler puts it into the program's layers, and the engine, the
packing, the file format and the cost report read it.  Nothing re-derives
a bit-depth, an integer range or a scale on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .spec import QuantSpec

__all__ = ["Grid"]

f32 = np.float32


def _frozen(values, dtype) -> np.ndarray:
    array = np.array(values, dtype=dtype)  # a copy: the grid never shares memory with its source
    array.setflags(write=False)
    return array


def _from_spec(name: str, doc: str) -> property:
    """A read-only property that answers with the grid's ``spec.<name>``."""
    return property(lambda grid: getattr(grid.spec, name), doc=doc)


@dataclass(frozen=True, eq=False)
class Grid:
    """A quantisation grid: ``spec`` (bits, sign, range), ``scale`` and ``zero_point``.

    ``q = clamp(round(x * float32(1 / scale)) + zero_point, quant_min, quant_max)``
    (rounding half to even, in float32: what PyTorch computes), and back
    ``x = (q - zero_point) * scale``.

    Args:
        spec: the :class:`QuantSpec`.
        scale: positive finite scale(s): one number for a per-tensor spec,
            one per channel (a 1-D sequence) for a per-channel spec.  Stored
            as float32, the precision quantisers and PyTorch's kernels use.
        zero_point: integer(s) shaped like ``scale``, within the spec's
            integer range.

    Attributes:
        spec, scale (read-only float32 array, 0-d or 1-d), zero_point
        (read-only int64 array of the same shape).

    Raises:
        TypeError: ``spec`` is not a QuantSpec, or a zero point is not an integer.
        ValueError: a scale that is not positive and finite, a zero point
            outside the spec's range (or not 0 for a symmetric spec), or
            shapes that do not match the granularity.

    Example:
        >>> g = Grid(QuantSpec.for_activations(8), 0.05, 0)
        >>> g.quantise(np.array([0.0, 0.26, 99.0])).tolist()
        [0, 5, 255]
    """

    spec: QuantSpec
    scale: np.ndarray
    zero_point: np.ndarray

    def __post_init__(self):
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {self.spec!r}")
        scale = np.asarray(self.scale)
        zero_point = np.asarray(self.zero_point)
        if zero_point.size and not (np.issubdtype(zero_point.dtype, np.integer)
                                    or np.all(np.mod(zero_point, 1) == 0)):
            raise TypeError(f"zero_point must hold integers, got {zero_point!r}")
        if zero_point.shape == () and scale.ndim == 1:
            zero_point = np.full(scale.shape, zero_point)
        dims = 1 if self.spec.per_channel else 0
        if scale.ndim != dims or zero_point.shape != scale.shape:
            kind = "one per channel (1-D)" if dims else "one number"
            raise ValueError(f"a {self.spec.granularity} grid needs {kind} for scale and zero_point, "
                             f"got scale shape {scale.shape} and zero_point shape {zero_point.shape}")
        scale = _frozen(scale, f32)
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise ValueError(f"scale must be positive and finite, got {self.scale!r}")
        zero_point = _frozen(zero_point, np.int64)
        if zero_point.size and (zero_point.min() < self.spec.quant_min or zero_point.max() > self.spec.quant_max):
            raise ValueError(f"zero_point must lie in the grid's range {self.spec.quant_min}..{self.spec.quant_max}, "
                             f"got {zero_point.min()}..{zero_point.max()}")
        if self.spec.symmetric and zero_point.any():
            raise ValueError(f"a symmetric spec fixes the zero point at 0, got zero_point {zero_point.tolist()}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    # ------------------------------------------------------------------ what the spec says
    bits = _from_spec("bits", "Bit-depth of the integers (int).")
    quant_min = _from_spec("quant_min", "Smallest integer of the grid (int).")
    quant_max = _from_spec("quant_max", "Largest integer of the grid (int).")
    signed = _from_spec("signed", "Two's-complement integers (True) or unsigned ones.")
    per_channel = _from_spec("per_channel", "One scale per channel (True) or one for the whole tensor.")

    @property
    def channels(self) -> int | None:
        """Number of per-channel scales, or None for a per-tensor grid."""
        return int(self.scale.shape[0]) if self.per_channel else None

    # ------------------------------------------------------------------ integers and real values
    def quantise(self, x) -> np.ndarray:
        """Real values to the grid's integers (int64), computed as PyTorch does.

        ``clamp(rint(float32(x) * (float32(1) / float32(scale))) + zero_point, quant_min, quant_max)``;
        a per-channel grid applies its scales along the first axis.
        """
        x = np.asarray(x, dtype=f32)
        inv = f32(1.0) / self._along(self.scale, x)
        q = np.rint(x * inv) + self._along(self.zero_point, x)
        return np.clip(q, self.quant_min, self.quant_max).astype(np.int64)

    def dequantise(self, q) -> np.ndarray:
        """The grid's integers to real values, float64: ``(q - zero_point) * scale``."""
        q = np.asarray(q, dtype=np.int64)
        return (q - self._along(self.zero_point, q)) * self._along(self.scale, q).astype(np.float64)

    def code(self, value: float | None, *, default: int) -> int:
        """The integer that the real ``value`` rounds to (clamped to the range), or ``default`` for None.

        The bound of a clamp on this grid: a ReLU's 0 is ``code(0.0)`` (the
        zero point), a ReLU6's 6 is ``code(6.0)``.  Per tensor only.
        """
        if self.per_channel:
            raise ValueError("code() needs a per-tensor grid")
        if value is None or (isinstance(value, float) and math.isinf(value)):
            return default
        return int(self.quantise(np.array(value)))

    def clamp_range(self, activation) -> tuple:
        """The integer range of outputs on this grid after the real clamp ``activation``.

        Args:
            activation: None (no clamp) or ``(low, high)`` reals, either None
                for unbounded: ``(0.0, None)`` is a ReLU, ``(0.0, 6.0)`` a ReLU6.

        Returns:
            ``(low, high)`` integers within ``quant_min..quant_max``.  Rounding
            onto the grid is monotone, so clamping the real value and then
            rounding gives the same integer as rounding and then clamping to
            these bounds.
        """
        if activation is None:
            return self.quant_min, self.quant_max
        lo, hi = activation
        return (max(self.quant_min, self.code(lo, default=self.quant_min)),
                min(self.quant_max, self.code(hi, default=self.quant_max)))

    def _along(self, values, like):
        if values.ndim == 0:
            return values
        return values.reshape((-1,) + (1,) * (np.ndim(like) - 1))

    # ------------------------------------------------------------------ value semantics
    def replace(self, **changes) -> "Grid":
        """A copy with some of ``spec``, ``scale``, ``zero_point`` changed (validated again)."""
        fields = {"spec": self.spec, "scale": self.scale, "zero_point": self.zero_point, **changes}
        return Grid(**fields)

    def same_as(self, other) -> bool:
        """True when ``other`` is a Grid with the same spec, scales and zero points."""
        return (isinstance(other, Grid) and self.spec == other.spec
                and self.scale.shape == other.scale.shape and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point, other.zero_point))

    def __eq__(self, other) -> bool:
        return self.same_as(other)

    def __hash__(self) -> int:
        return hash((self.spec, self.scale.tobytes(), self.zero_point.tobytes()))

    def to_dict(self) -> dict:
        """JSON-friendly fields (scales as floats: a float32 value survives a float round-trip exactly)."""
        return {"spec": self.spec.to_dict(), "scale": self.scale.tolist(), "zero_point": self.zero_point.tolist()}

    @classmethod
    def from_dict(cls, fields: dict) -> "Grid":
        """Inverse of :meth:`to_dict`."""
        return cls(QuantSpec.from_dict(fields["spec"]), fields["scale"], fields["zero_point"])

    def __repr__(self) -> str:
        if self.per_channel:
            where = f"{self.channels} scales {float(self.scale.min()):.4g}..{float(self.scale.max()):.4g}"
        else:
            where = f"scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}"
        return f"Grid({self.spec}, {where})"
