"""Activation-aware truncated SVD of one weight matrix (SVD-LLM, arXiv 2403.07378; ASVD).

A Linear W [out, in] sees inputs x with (weighted) second moment C = Σ_x w(x) x xᵀ. The
error a replacement Ŵ adds on those inputs is

    Σ_x w(x) ‖(W − Ŵ) x‖² = tr((W − Ŵ) C (W − Ŵ)ᵀ) = ‖(W − Ŵ) S‖²_F   with S Sᵀ = C,

so the best Ŵ of rank r is the truncated SVD of W·S, mapped back by S⁻¹ (Eckart–Young on
the whitened matrix): W S = U Σ Vᵀ, Ŵ = U_r Σ_r · V_rᵀ S⁻¹. Plain SVD is the case S = I.
S comes from the eigendecomposition of C + λI (λ = ``damp`` × mean diag C): with λ = 0
this is exactly optimal on the calibration inputs (a pseudo-inverse where C is singular);
a small λ keeps directions the calibration never exercised from collapsing to zero.
``tests/methods/lowrank`` checks optimality against plain SVD and exactness at full rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """W ≈ B @ A with B [out, m] (U·Σ) and A [m, in] (Vᵀ·S⁻¹), m = min(out, in), columns of
    B in decreasing singular value. ``energy`` [m]: σ², the squared error each rank kept
    removes from the weighted error on the calibration inputs (their sum is ‖W S‖²)."""

    b: torch.Tensor
    a: torch.Tensor
    energy: torch.Tensor

    def truncated(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, rank], A [rank, in]), contiguous copies."""
        return self.b[:, :rank].contiguous(), self.a[:rank].contiguous()

    def error(self, rank: int) -> float:
        """Σ_x w(x)‖(W − Ŵ_rank) x‖² on the calibration inputs (the dropped σ²)."""
        return float(self.energy[rank:].sum())


def whitening(cov: torch.Tensor | None, size: int, *, damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁺) with S Sᵀ = C + λI, λ = ``damp`` · mean diag C; identity when ``cov`` is None
    or zero (no calibration input: plain SVD). float64, [size, size] each."""
    if cov is None or not bool(cov.abs().sum() > 0):
        eye = torch.eye(size, dtype=torch.float64)
        return eye, eye
    cov = cov.double()
    cov = (cov + cov.T) / 2
    lam = damp * float(cov.diagonal().mean())
    values, vectors = torch.linalg.eigh(cov + lam * torch.eye(size, dtype=torch.float64))
    floor = float(values.max()) * size * torch.finfo(torch.float64).eps  # below this: the null space
    root = values.clamp(min=0).sqrt()
    inverse = torch.where(values > floor, 1.0 / root.clamp(min=1e-300), torch.zeros_like(root))
    return vectors * root, inverse[:, None] * vectors.T


def factorize(weight: torch.Tensor, cov: torch.Tensor | None = None, *, damp: float = 0.0) -> Factors:
    """All ranks of ``weight`` [out, in] whitened by ``cov`` [in, in] (None: plain SVD);
    truncate with `Factors.truncated`. Computed in float64."""
    w = weight.double()
    s, s_inv = whitening(cov, w.shape[1], damp=damp)
    u, sigma, vh = torch.linalg.svd(w @ s, full_matrices=False)
    return Factors(u * sigma, vh @ s_inv, sigma**2)


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """tr((W − Ŵ) C (W − Ŵ)ᵀ): the weighted squared error on the inputs C summarises."""
    delta = (weight - approx).double()
    return float(((delta @ cov.double()) * delta).sum())
