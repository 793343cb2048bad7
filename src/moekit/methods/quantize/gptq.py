"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323) and the Hessian it needs.

The algorithm is written here by hand (compressed-tensors has none); every scale, zero
point, rounding and dequantization inside it is compressed-tensors' own, through
`moekit.methods.quantize.rtn.qparams` and the library's ``quantize`` / ``dequantize``.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

from moekit.errors import MoekitError
from moekit.methods.quantize.rtn import assemble, float_weight, qparams
from moekit.methods.quantize.scheme import QuantizedWeight, QuantScheme

# Cholesky retries: the dampening grows tenfold each time, then GPTQ gives up on the
# Hessian and rounds to nearest (identity Hessian).
CHOLESKY_TRIES = 6


class HessianAccumulator:
    """H = 2/n Σ_t w_t x_t x_tᵀ over the n calibration inputs x_t of one Linear.

    With all w_t = 1 this is GPTQ's H = 2XXᵀ/n, the Hessian of the layer-wise loss
    ‖WX - ŴX‖²/n. Per-token weights w_t give MoEQuant's gate weighting (arXiv
    2505.03804: a token counts in an expert's H by its routing weight). The sum is kept
    in ``dtype`` (float32, or float64 for long runs) and divided only in `finish`;
    ``xtx``, ``tokens`` and ``total_weight`` are plain sums, so ranks can all-reduce them.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.in_features = in_features
        self.dtype = dtype
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.tokens = 0
        self.total_weight = 0.0

    def reduce(self, world) -> None:
        """This rank's sums become every rank's (a collective over a `moekit.distributed.World`):
        Σ w·x·xᵀ, the token count and the total weight are plain sums."""
        from moekit.distributed.collectives import all_sum_many

        counts = torch.tensor([self.tokens, self.total_weight], dtype=torch.float64)
        reduced = all_sum_many({"xtx": self.xtx, "counts": counts}, world, "combining Hessians")
        self.xtx = reduced["xtx"]
        self.tokens, self.total_weight = int(reduced["counts"][0].item()), float(reduced["counts"][1].item())

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Accumulate Σ w_t x_t x_tᵀ for ``x`` [n, in] (leading dims are flattened) and
        per-token ``weight`` [n] (all ones when None)."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[-1]} features, the Linear has {self.in_features}")
        if self.xtx.device != x.device and self.tokens == 0:
            self.xtx = self.xtx.to(x.device)  # follow the activations' device
        x = x.to(device=self.xtx.device, dtype=self.dtype)
        if weight is None:
            self.xtx += x.T @ x
            self.total_weight += float(x.shape[0])
        else:
            w = weight.reshape(-1).to(device=x.device, dtype=self.dtype)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"{w.shape[0]} token weights for {x.shape[0]} tokens")
            self.xtx += (x * w[:, None]).T @ x
            self.total_weight += float(w.sum())
        self.tokens += x.shape[0]

    def finish(self) -> torch.Tensor:
        """H [in, in] = 2·xtx / tokens (all zeros when no token came: `quantize_gptq`
        then rounds to nearest)."""
        if self.tokens == 0:
            return torch.zeros_like(self.xtx)
        return self.xtx * (2.0 / self.tokens)


def _inverse_cholesky(hessian: torch.Tensor, damp: float, notes: list[str]) -> tuple[torch.Tensor, float]:
    """U upper-triangular with UᵀU = (H + λI)⁻¹, λ = damp·mean(diag H) (GPTQ §4 step 3:
    the rows of U are the inverse-Hessian rows the column-by-column updates need).
    Retries with tenfold dampening when a factorization fails; returns (U, damp used)."""
    n = hessian.shape[0]
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for _ in range(CHOLESKY_TRIES):
        low, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        bigger = damp * 10 if damp > 0 else 0.01
        notes.append(f"Cholesky failed with damp {damp:g}; retried with {bigger:g}")
        damp = bigger
    notes.append("Hessian could not be factorized; rounded to nearest (identity Hessian)")
    return eye / (1 + damp), damp


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    where: str = "weight",
) -> QuantizedWeight:
    """GPTQ: quantize the columns of W one at a time, each time spreading the rounding
    error over the columns not yet quantized so as to minimise tr((W-Ŵ) H (W-Ŵ)ᵀ).

    With U the upper Cholesky factor of (H + λI)⁻¹, column j is rounded to q_j and the
    rest move by W[:, j:] -= ((w_j - q_j) / U_jj) U_j,j: (paper eq. 3 and Algorithm 1).
    The reference code's choices (github.com/IST-DASLab/gptq, ``fasterquant``):

    - columns with diag H = 0 (inputs that were always 0) get H_jj = 1 and W[:, j] = 0;
    - λ = damp·mean(diag H); the updates are applied lazily in blocks of columns;
    - a group's scale is computed from the current (error-updated) weights when its
      first column comes up. Blocks here hold whole groups (``block_size`` is rounded
      to a multiple of g), so those are exactly the weights the naive column-by-column
      algorithm would see.
    - ``act_order``: columns go by descending diag H, with "static groups" (llm-
      compressor's actorder="weight"): groups stay contiguous in the original order and
      their scales come from the original weight, so the result needs no g_idx.
      Per-channel scales are always computed from the original weight (after the dead
      inputs are zeroed; the reference measures them before, which only widens them).

    An all-zero Hessian (an expert no calibration token reached) is replaced by the
    identity, which makes GPTQ exactly round-to-nearest.

    Args:
        weight: [out, in]; computed in float32 on its device.
        hessian: [in, in], e.g. `HessianAccumulator.finish`.
        scheme: bits, group size, symmetry.
        damp: relative dampening of the diagonal.
        act_order: process columns by descending diag H (static groups).
        block_size: columns per lazy-update block.
        scale_dtype: the dtype the scales will be saved in (see `quantize_rtn`).
        where: the Linear's name, for error messages.
    """
    W = float_weight(weight, where)
    out, cols = W.shape
    scheme.check(cols, where)
    if tuple(hessian.shape) != (cols, cols):
        raise MoekitError(f"{where}: the Hessian is {tuple(hessian.shape)}, the weight needs [{cols}, {cols}]")
    if damp < 0 or block_size < 1:
        raise MoekitError(f"{where}: damp must be >= 0 and block_size >= 1 (got {damp}, {block_size})")
    H = hessian.detach().to(device=W.device, dtype=torch.float32, copy=True)
    if not torch.isfinite(H).all():
        raise MoekitError(f"{where}: the Hessian contains NaN or inf; accumulate the calibration activations in float32")
    notes: list[str] = []
    if not H.any():
        notes.append("zero Hessian (no calibration tokens): identity, i.e. round to nearest")
        H = torch.eye(cols, dtype=torch.float32, device=W.device)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = cols if scheme.group_size is None else scheme.group_size
    static = act_order or scheme.group_size is None
    groups = cols // g
    scale = torch.empty(out, groups, dtype=torch.float32, device=W.device)
    zero = torch.zeros(out, groups, dtype=torch.int8, device=W.device)
    if static:
        scale, zero = qparams(W, scheme, scale_dtype=scale_dtype)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    U, damp_used = _inverse_cholesky(H, damp, notes)
    order = perm.tolist()

    # One column with its group's scale is a per-channel quantization of that column:
    # the library's elementwise ops are the same as in the group layout, bit for bit.
    column_args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy="channel")
    values = torch.empty(out, cols, dtype=torch.int8, device=W.device)
    block = block_size if static else g * max(1, block_size // g)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = order[i1 + i]  # the original column this step quantizes
            k = c // g
            if not static and c % g == 0:
                s, z = qparams(W1[:, i : i + g], scheme, scale_dtype=scale_dtype)
                scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
            s = scale[:, k : k + 1]
            z = None if scheme.symmetric else zero[:, k : k + 1]
            w = W1[:, i : i + 1]
            q = quantize(w, s, z, column_args, dtype=torch.int8)
            values[:, c] = q[:, 0]
            e = (w - dequantize(q, s, z, column_args)) / U1[i, i]
            W1[:, i:] -= e @ U1[i : i + 1, i:]
            err1[:, i] = e[:, 0]
        # the lazy batch update: the whole block's errors reach the later columns at once
        W[:, i2:] -= err1 @ U[i1:i2, i2:]

    return assemble(
        values, scale, zero, scheme, scale_dtype=scale_dtype, method="gptq", damp=damp_used, notes=notes
    )
