"""``QuantSpec``: one small value object that describes a quantisation choice.

A spec says *which* integer grid a tensor is rounded onto; the scale and zero
point (computed from the data) say *where* that grid lies on the real line.
The same object is used for post-training quantisation, for retraining and
by the NNA simulator, which stores the integers at ``bits`` bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._args import check_choice, check_int

__all__ = ["GRANULARITIES", "MIN_BITS", "MAX_BITS", "QuantSpec"]

MIN_BITS = 2
MAX_BITS = 16
GRANULARITIES = ("per_tensor", "per_channel")


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantised: bit-depth, sign, symmetry, granularity, range.

    A real value ``x`` becomes the integer
    ``q = clamp(round(x / scale) + zero_point, quant_min, quant_max)``
    (round half to even, as PyTorch does) and is read back as
    ``(q - zero_point) * scale``.

    Attributes:
        bits: bit-depth, an integer from 2 to 16.  Every value is first-class,
            'exotic' ones such as 3, 5, 6 and 7 included.
        signed: integers in ``[-2^(bits-1), 2^(bits-1) - 1]`` (True) or in
            ``[0, 2^bits - 1]`` (False, e.g. activations after a ReLU).
        symmetric: True fixes the zero point at 0, so real zero is exactly
            the integer 0 (a signed grid is then symmetric around zero; an
            unsigned one starts at zero).  False lets the zero point move so
            that the grid covers ``[min, max]`` of the data (asymmetric).
        granularity: ``"per_tensor"`` (one scale for the whole tensor) or
            ``"per_channel"`` (one scale per output channel, along ``ch_axis``).
        narrow_range: drop the most negative integer of a signed grid
            (``-127..127`` instead of ``-128..127`` at 8 bits), or the top
            integer of an unsigned one, so a signed grid is exactly symmetric.
        ch_axis: the channel axis for ``"per_channel"`` (0: output channels
            of a Conv2d or Linear weight).

    Raises:
        TypeError: ``bits`` is not an integer (e.g. ``4.5``).
        ValueError: ``bits`` outside 2..16, or an unknown ``granularity``.

    Example:
        >>> QuantSpec(4).quant_min, QuantSpec(4).quant_max
        (-8, 7)
        >>> QuantSpec.for_weights(3).levels   # narrow range: -3..3
        7
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: str = "per_tensor"
    narrow_range: bool = False
    ch_axis: int = 0

    def __post_init__(self):
        check_int("bits", self.bits, minimum=MIN_BITS, maximum=MAX_BITS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        for name in ("signed", "symmetric", "narrow_range"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int("ch_axis", self.ch_axis, minimum=0)

    # Convenient constructors for the three roles a quantiser plays in a network.
    @classmethod
    def for_weights(cls, bits: int, granularity: str = "per_channel", narrow_range: bool = True) -> "QuantSpec":
        """Spec for weights: signed, symmetric (zero point 0, so pruned zeros stay zero).

        Args:
            bits: bit-depth (2..16).
            granularity: ``"per_channel"`` (default) or ``"per_tensor"``.
            narrow_range: use ``-(2^(b-1)-1) .. 2^(b-1)-1`` so the grid is
                symmetric (at 2 bits: the ternary grid -1, 0, 1).

        Returns:
            A QuantSpec.
        """
        return cls(bits=bits, signed=True, symmetric=True, granularity=granularity, narrow_range=narrow_range)

    @classmethod
    def for_activations(cls, bits: int) -> "QuantSpec":
        """Spec for activations after a ReLU: unsigned, zero point 0, per tensor.

        A ReLU's output is never negative, so the grid ``0 .. 2^bits - 1``
        covers it from zero: no integer is spent on negative values.

        Args:
            bits: bit-depth (2..16); the levels are ``0, s, 2s ... (2^bits - 1) s`` for a scale ``s``.

        Returns:
            ``QuantSpec(bits, signed=False, symmetric=True, granularity="per_tensor")``.
        """
        return cls(bits=bits, signed=False, symmetric=True, granularity="per_tensor")

    @classmethod
    def for_inputs(cls, bits: int) -> "QuantSpec":
        """Spec for the network input (a normalised image is signed): unsigned with a zero point.

        The zero point shifts the unsigned grid so that it covers the
        image's negative values too.

        Args:
            bits: bit-depth (2..16).

        Returns:
            ``QuantSpec(bits, signed=False, symmetric=False, granularity="per_tensor")``.
        """
        return cls(bits=bits, signed=False, symmetric=False, granularity="per_tensor")

    @property
    def quant_min(self) -> int:
        """Smallest integer of the grid."""
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def quant_max(self) -> int:
        """Largest integer of the grid."""
        if self.signed:
            return 2 ** (self.bits - 1) - 1
        return 2 ** self.bits - 1 - (1 if self.narrow_range else 0)

    @property
    def levels(self) -> int:
        """Number of integers in the grid (at most ``2**bits``)."""
        return self.quant_max - self.quant_min + 1

    @property
    def per_channel(self) -> bool:
        """True for ``granularity="per_channel"``."""
        return self.granularity == "per_channel"

    def replace(self, **changes) -> "QuantSpec":
        """A copy with some fields changed, e.g. ``spec.replace(bits=4)`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-friendly, for caches and the simulator)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "QuantSpec":
        """Inverse of :meth:`to_dict`."""
        return cls(**fields)

    def __str__(self) -> str:
        kind = "int" if self.signed else "uint"
        sym = "symmetric" if self.symmetric else "asymmetric"
        narrow = ", narrow" if self.narrow_range else ""
        return f"{kind}{self.bits} {sym} {self.granularity.replace('_', '-')}{narrow}"
