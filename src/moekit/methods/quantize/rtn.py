"""Round-to-nearest (RTN) quantization: min/max scales, then nearest integer.

The baseline every other method is measured against, and the building block GPTQ uses
for its scales. All the arithmetic is compressed-tensors' own (``calculate_qparams``,
``quantize``, ``dequantize``); this module only gathers per-group minima and maxima and
guards the one case where the library produces a NaN.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from moekit.errors import MoekitError
from moekit.methods.quantize.scheme import QuantizedWeight, QuantScheme


def float_weight(weight: torch.Tensor, where: str) -> torch.Tensor:
    """A float32 copy of ``weight`` [out, in] (quantization math runs in fp32 on every
    device), or a `MoekitError` if it is not a finite matrix."""
    if weight.ndim != 2:
        raise MoekitError(f"{where}: expected a Linear weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32, copy=True)
    if not torch.isfinite(w).all():
        raise MoekitError(f"{where}: the weight contains NaN or inf; quantize a finite checkpoint")
    return w


def qparams(
    weight: torch.Tensor, scheme: QuantScheme, *, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero point of ``weight`` [out, in] under ``scheme``.

    Groups are contiguous runs of g columns (compressed-tensors' layout), so the result
    has shape [out, in / g] (or [out, 1] per channel). compressed-tensors' formula:
    min ← min(min, 0), max ← max(max, 0); symmetric s = max(|min|, |max|) / 2^(b-1), z = 0;
    asymmetric s = (max - min) / (2^b - 1), z = round(-2^(b-1) - min/s); s = 0 → eps.

    Returns:
        scale float32 [out, groups] (rounded to ``scale_dtype``'s values), zero point
        int8 [out, groups] (all zero when symmetric).
    """
    out, cols = weight.shape
    g = cols if scheme.group_size is None else scheme.group_size
    grouped = weight.reshape(out, cols // g, g)
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    round_to = None if scale_dtype == torch.float32 else scale_dtype
    scale, zero = calculate_qparams(lo, hi, scheme.args(scale_dtype=round_to))
    if not scheme.symmetric:
        # The library computes z = -2^(b-1) - min/s before it replaces s = 0 by eps, so
        # an all-zero group gets z = NaN cast to int8 (undefined). Any z represents that
        # group exactly (q = z, ŵ = 0), so pin it to 0.
        empty = (lo >= 0) & (hi <= 0)
        zero = torch.where(empty, torch.zeros_like(zero), zero)
    return scale.to(torch.float32), zero


def assemble(
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    scheme: QuantScheme,
    *,
    scale_dtype: torch.dtype,
    method: str,
    damp: float | None = None,
    notes: list[str] | None = None,
) -> QuantizedWeight:
    """A `QuantizedWeight` from integers [out, in] and qparams [out, groups], with
    ``dequantized`` = compressed-tensors' ``dequantize`` of exactly these tensors."""
    zp = None if scheme.symmetric else zero_point
    dequantized = dequantize(values, scale, zp, scheme.args())
    return QuantizedWeight(
        values=values,
        scale=scale,
        zero_point=zp,
        dequantized=dequantized,
        scheme=scheme,
        scale_dtype=scale_dtype,
        method=method,
        damp=damp,
        notes=list(notes or []),
    )


def quantize_rtn(
    weight: torch.Tensor,
    scheme: QuantScheme,
    *,
    scale_dtype: torch.dtype = torch.float32,
    where: str = "weight",
) -> QuantizedWeight:
    """Round-to-nearest: Ŵ = s·(clamp(round(W/s + z)) - z) with min/max `qparams`.

    Args:
        weight: [out, in], any float dtype (computed in float32 on its device).
        scheme: bits, group size, symmetry.
        scale_dtype: the dtype the scales will be saved in (the checkpoint's, e.g.
            ``torch.bfloat16``); scales are rounded to it before the integers are
            chosen, so the saved integers and scales dequantize to ``dequantized``.
        where: the Linear's name, for error messages.

    Returns:
        `QuantizedWeight` whose ``dequantized`` equals compressed-tensors'
        ``fake_quantize(weight, scale, zero_point, scheme.args())``.
    """
    w = float_weight(weight, where)
    scheme.check(w.shape[1], where)
    scale, zero = qparams(w, scheme, scale_dtype=scale_dtype)
    zp = None if scheme.symmetric else zero
    values = quantize(w, scale, zp, scheme.args(), dtype=torch.int8)
    return assemble(values, scale, zero, scheme, scale_dtype=scale_dtype, method="rtn")
