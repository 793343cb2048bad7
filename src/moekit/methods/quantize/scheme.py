"""What a quantized Linear is: the scheme (bits, group size, symmetry) and the result.

The numbers follow compressed-tensors exactly, because quantized checkpoints are saved in
its ``pack-quantized`` format and transformers / vLLM dequantize them with its code:

- signed integers q ∈ [-2^(b-1), 2^(b-1) - 1] (``calculate_range``), stored as int8;
- symmetric: s = max|w| / 2^(b-1), no zero point, ŵ = q·s (so +max|w| clamps to
  (2^(b-1) - 1)·s, one step short; -max|w| is exact);
- asymmetric: s = (max - min) / (2^b - 1), z = round(-2^(b-1) - min/s) ∈ int8, ŵ = (q - z)·s;
- min and max always include 0 (0.0 stays exactly representable), and a zero scale
  (an all-zero group) becomes the scale dtype's eps;
- groups are contiguous runs of ``group_size`` input columns: column c uses scale
  [:, c // group_size].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs

from moekit.errors import MoekitError

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight quantization of one Linear ``W [out, in]``.

    Attributes:
        bits: b, 2..8 (pack-quantized packs 32/b values per int32 word).
        group_size: g, input columns that share one scale (and zero point); ``None``
            means one scale per output channel (strategy "channel").
        symmetric: no zero point (ŵ = q·s) when True; ŵ = (q - z)·s otherwise.
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = True

    def args(self, *, scale_dtype: torch.dtype | None = None) -> QuantizationArgs:
        """The compressed-tensors description of this scheme (for the checkpoint's
        ``config_groups``, leave ``scale_dtype`` unset). ``scale_dtype`` makes
        ``calculate_qparams`` round the scales to that dtype, the one they are saved in."""
        if self.group_size is None:
            return QuantizationArgs(
                num_bits=self.bits, type="int", symmetric=self.symmetric, strategy="channel", scale_dtype=scale_dtype
            )
        return QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy="group",
            group_size=self.group_size,
            scale_dtype=scale_dtype,
        )

    def groups(self, in_features: int) -> int:
        """Number of scales per output row: in / g, or 1 per channel."""
        return 1 if self.group_size is None else in_features // self.group_size

    def check(self, in_features: int, where: str) -> None:
        """Raise `MoekitError` (one line: the problem and the fix) unless this scheme can
        quantize a Linear with ``in_features`` inputs; ``where`` names that Linear."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, Integral) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise MoekitError(
                f"{where}: {self.bits!r} bits is not supported; "
                f"choose an integer number of bits from {MIN_BITS} to {MAX_BITS}"
            )
        g = self.group_size
        if g is None:
            return
        if isinstance(g, bool) or not isinstance(g, Integral) or g <= 0:
            raise MoekitError(f"{where}: group size {g!r} is not a positive integer; use e.g. 128, or none for one scale per output channel")
        if in_features % g:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            hint = f"a group size that divides it (e.g. {divisors[-1]})" if divisors else "a group size that divides it"
            raise MoekitError(
                f"{where}: group size {g} does not divide its {in_features} input features; "
                f"use {hint}, or none for one scale per output channel"
            )

    def packed_bytes(self, out_features: int, in_features: int, scale_bytes: int = 2) -> int:
        """Exact bytes of one Linear's tensors in compressed-tensors ``pack-quantized``:

        - ``weight_packed`` int32 [out, ⌈in·b/32⌉] (dense bit packing across words);
        - ``weight_scale`` [out, groups], ``scale_bytes`` each;
        - ``weight_shape`` int64 [2];
        - ``weight_zero_point`` int32 [⌈out·b/32⌉, groups] when asymmetric (packed
          along dim 0, the output dimension).
        """
        groups = self.groups(in_features)
        total = 4 * out_features * math.ceil(in_features * self.bits / 32)
        total += scale_bytes * out_features * groups
        total += 8 * 2
        if not self.symmetric:
            total += 4 * math.ceil(out_features * self.bits / 32) * groups
        return total


@dataclass
class QuantizedWeight:
    """One quantized Linear, as compressed-tensors stores and restores it.

    Attributes:
        values: int8 [out, in], the integers q of compressed-tensors' ``quantize``.
        scale: float32 [out, groups] (values exactly representable in ``scale_dtype``).
        zero_point: int8 [out, groups], or ``None`` when symmetric.
        dequantized: float32 [out, in], exactly ``dequantize(values, scale, zero_point,
            scheme.args())``: ŵ = (q - z)·s.
        scheme: the scheme it was quantized with.
        scale_dtype: the dtype the scale is saved in (`compressed` casts to it losslessly).
        method: "rtn" or "gptq".
        damp: GPTQ's relative dampening actually used (after any retries), else None.
        notes: what the method had to do differently (zero Hessian, Cholesky retries).
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    dequantized: torch.Tensor
    scheme: QuantScheme
    scale_dtype: torch.dtype = torch.float32
    method: str = "rtn"
    damp: float | None = None
    notes: list[str] = field(default_factory=list)

    def proxy_loss(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
        """GPTQ's objective tr((W - Ŵ) H (W - Ŵ)ᵀ) for ``weight`` [out, in] and ``hessian``
        [in, in] (= Σ_t ‖(W - Ŵ) x_t‖² · 2/n for H = 2/n Σ x_t x_tᵀ); the squared
        Frobenius error ‖W - Ŵ‖² without a Hessian. Computed in float64."""
        delta = weight.double().to(self.dequantized.device) - self.dequantized.double()
        if hessian is None:
            return float((delta * delta).sum())
        return float(((delta @ hessian.double().to(delta.device)) * delta).sum())

    def compressed(self) -> dict[str, torch.Tensor]:
        """The tensors compressed-tensors' ``PackedQuantizationCompressor.compress`` would
        write for this Linear (prefix them with the module name): ``weight_packed``,
        ``weight_scale`` (in ``scale_dtype``), ``weight_shape`` and, when asymmetric,
        ``weight_zero_point``. Packs ``values`` directly rather than re-quantizing a
        dequantized weight, which after a cast to bf16 can round to the neighbouring
        integer at 8 bits."""
        bits = self.scheme.bits
        out = {
            "weight_packed": pack_to_int32(self.values, bits),
            "weight_scale": self.scale.to(self.scale_dtype),
            "weight_shape": torch.tensor(self.values.shape),
        }
        if self.zero_point is not None:
            out["weight_zero_point"] = pack_to_int32(self.zero_point, bits, packed_dim=0).contiguous()
        return out


def fitted_group_size(group_size: int | None, widths) -> int | None:
    """The largest of ``group_size``, its half, its quarter... (at least 16) that divides every
    input width in ``widths``; None (one scale per channel) when none does. Models' widths
    are rarely all multiples of 128 (a reference model's experts are 96 wide)."""
    size = group_size
    while size is not None and size >= 16:
        if all(width % size == 0 for width in widths):
            return size
        size //= 2
    return None
