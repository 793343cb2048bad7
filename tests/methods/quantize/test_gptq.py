"""GPTQ: the blocked Cholesky implementation equals a naive column-by-column one written
from the paper's formulas, beats round-to-nearest on its own objective, never produces
NaN/inf (zero Hessian, zero rows, non-PSD Hessians), and the Hessian accumulator sums
what it says."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize

from moekit.errors import MoekitError
from moekit.methods.quantize import (
    HessianAccumulator,
    QuantScheme,
    qparams,
    quantize_gptq,
    quantize_rtn,
)


def _inputs(n=512, cols=64, seed=0, dead=()):
    """Correlated inputs (a random mixing of white noise) with uneven feature scales,
    and optionally some features that are always 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.3
    x = x + 0.5 * torch.randn(n, cols, generator=gen)
    x = x * torch.linspace(0.2, 2.0, cols)
    x[:, list(dead)] = 0.0
    return x


def _hessian(x):
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.finish()


def _weight(out=12, cols=64, seed=1):
    return torch.randn(out, cols, generator=torch.Generator().manual_seed(seed))


def naive_gptq(weight, hessian, scheme, damp=0.01, act_order=False):
    """GPTQ as the paper states it, one column at a time with the explicit inverse
    Hessian (OBS update, Frantar et al. eq. 3): quantize column c to q, then
    W -= (w_c - q)/[H⁻¹]_cc · [H⁻¹]_c,: and H⁻¹ -= [H⁻¹]_:,c [H⁻¹]_c,: / [H⁻¹]_cc.
    No blocks, no Cholesky; scales as in the reference code."""
    W, H = weight.clone().float(), hessian.clone().float()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = scheme.group_size or cols
    static = act_order or scheme.group_size is None
    scale, zero = qparams(W, scheme) if static else (torch.zeros(W.shape[0], cols // g), torch.zeros(W.shape[0], cols // g, dtype=torch.int8))
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols)
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(cols))
    col_args = QuantScheme(scheme.bits, None, scheme.symmetric).args()
    for c in order.tolist():
        k = c // g
        if not static and c % g == 0:  # a group starts: scales from the current weights
            s, z = qparams(W[:, c : c + g], scheme)
            scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
        z = None if scheme.symmetric else zero[:, k : k + 1]
        q = fake_quantize(W[:, c : c + 1], scale[:, k : k + 1], z, col_args)[:, 0]
        d = Hinv[c, c]
        W -= ((W[:, c] - q) / d)[:, None] * Hinv[c][None, :]
        Hinv -= Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / d
        W[:, c] = q  # exact already up to rounding; the quantized value is the result
    return W, scale, zero


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [5, 128])
def test_blocked_gptq_equals_the_naive_column_by_column_algorithm(symmetric, group_size, act_order, block_size):
    x = _inputs(dead=(7, 40))
    H, W = _hessian(x), _weight()
    scheme = QuantScheme(3, group_size, symmetric)
    qw = quantize_gptq(W, H, scheme, act_order=act_order, block_size=block_size)
    expected, scale, zero = naive_gptq(W, H, scheme, act_order=act_order)
    assert torch.allclose(qw.scale, scale, rtol=1e-5, atol=0)
    assert torch.allclose(qw.dequantized, expected, rtol=1e-5, atol=1e-6)
    if not symmetric:
        assert torch.equal(qw.zero_point, zero)
    # what is saved decompresses to exactly this weight
    assert torch.equal(qw.dequantized, dequantize(qw.values, qw.scale, qw.zero_point, scheme.args()))
    assert torch.equal(qw.dequantized[:, [7, 40]], torch.zeros(12, 2))  # dead inputs
    assert qw.method == "gptq" and qw.damp == 0.01 and qw.notes == []


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scheme_kw", [{"group_size": 32}, {"group_size": None, "symmetric": False}])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_its_objective(bits, scheme_kw, act_order):
    """tr((W-Ŵ) H (W-Ŵ)ᵀ) on correlated inputs: GPTQ is well below RTN."""
    x = _inputs(cols=128, seed=bits)
    H, W = _hessian(x), _weight(16, 128, seed=bits)
    scheme = QuantScheme(bits, **scheme_kw)
    gptq = quantize_gptq(W, H, scheme, act_order=act_order).proxy_loss(W, H)
    rtn = quantize_rtn(W, scheme).proxy_loss(W, H)
    assert gptq < 0.8 * rtn
    # the objective is the output error on the calibration inputs: ‖(W - Ŵ)X‖²·2/n
    dq = quantize_rtn(W, scheme).dequantized
    assert rtn == pytest.approx(float(((x.double() @ (W - dq).double().T) ** 2).sum() * 2 / x.shape[0]), rel=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_zero_hessian_is_round_to_nearest(symmetric, group_size, act_order):
    """An expert no calibration token reached: finite, and exactly RTN."""
    W = _weight()
    scheme = QuantScheme(4, group_size, symmetric)
    acc = HessianAccumulator(64)
    assert acc.tokens == 0 and torch.equal(acc.finish(), torch.zeros(64, 64))
    qw = quantize_gptq(W, acc.finish(), scheme, act_order=act_order)
    rtn = quantize_rtn(W, scheme)
    assert torch.isfinite(qw.scale).all() and torch.isfinite(qw.dequantized).all()
    assert torch.equal(qw.values, rtn.values) and torch.equal(qw.scale, rtn.scale)
    assert "zero Hessian" in qw.notes[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_zero_weight_row_gives_finite_scales_and_zero_output(symmetric, group_size, act_order):
    W = _weight()
    W[3] = 0.0
    qw = quantize_gptq(W, _hessian(_inputs()), QuantScheme(2, group_size, symmetric), act_order=act_order)
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert torch.isfinite(qw.dequantized).all()
    assert torch.equal(qw.dequantized[3], torch.zeros(64))


@pytest.mark.parametrize("bits", range(2, 9))
def test_at_most_two_to_the_bits_values_per_group(bits):
    W, H = _weight(8, 64, seed=bits), _hessian(_inputs(seed=bits))
    for scheme, act_order in [(QuantScheme(bits, 16, False), False), (QuantScheme(bits, 16, True), True)]:
        qw = quantize_gptq(W, H, scheme, act_order=act_order)
        for row in qw.dequantized:
            for group in row.split(16):
                assert group.unique().numel() <= 2**bits


def test_cholesky_failure_retries_with_more_dampening():
    """A Hessian with a negative eigenvalue (-5% of its mean diagonal): damp 0.01 cannot
    make it positive definite, 0.1 can; the result says so and stays finite."""
    cols = 32
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=torch.Generator().manual_seed(3)))
    eig = torch.ones(cols)
    eig[0] = -0.05
    H = basis @ torch.diag(eig) @ basis.T
    qw = quantize_gptq(_weight(6, cols), H, QuantScheme(4, 16))
    assert qw.damp == pytest.approx(0.1)
    assert any("Cholesky failed with damp 0.01" in note for note in qw.notes)
    assert torch.isfinite(qw.dequantized).all()
    # a Hessian no dampening can rescue (negative definite): round to nearest, noted
    qw = quantize_gptq(_weight(6, cols), -torch.eye(cols), QuantScheme(4, 16))
    assert torch.equal(qw.values, quantize_rtn(_weight(6, cols), QuantScheme(4, 16)).values)
    assert "identity Hessian" in qw.notes[-1]


def test_bad_inputs_are_refused_with_a_message():
    W = _weight()
    with pytest.raises(MoekitError, match=r"up_proj: the Hessian is \(32, 32\), the weight needs \[64, 64\]"):
        quantize_gptq(W, torch.eye(32), QuantScheme(4, 16), where="up_proj")
    H = torch.eye(64)
    H[0, 0] = float("inf")
    with pytest.raises(MoekitError, match="NaN or inf"):
        quantize_gptq(W, H, QuantScheme(4, 16))
    with pytest.raises(MoekitError, match="group size 24 does not divide its 64"):
        quantize_gptq(W, torch.eye(64), QuantScheme(4, 24))


def test_hessian_accumulator_sums_weighted_outer_products():
    """H = 2/n Σ w_t x_t x_tᵀ, the same in one batch or several, any leading dims."""
    x = _inputs(n=96, cols=16)
    w = torch.rand(96, generator=torch.Generator().manual_seed(0))
    acc = HessianAccumulator(16)
    for xb, wb in zip(x.split(40), w.split(40)):
        acc.add(xb.reshape(2, -1, 16) if xb.shape[0] % 2 == 0 else xb, wb)
    expected = 2.0 / 96 * (x.double().T * w.double()) @ x.double()
    assert torch.allclose(acc.finish().double(), expected, rtol=1e-5, atol=1e-6)
    assert acc.tokens == 96 and acc.total_weight == pytest.approx(float(w.sum()))
    plain = HessianAccumulator(16, dtype=torch.float64)
    plain.add(x)
    assert torch.allclose(plain.finish(), 2.0 / 96 * x.double().T @ x.double())
    assert plain.total_weight == 96.0
    with pytest.raises(ValueError, match="17 features"):
        plain.add(torch.zeros(3, 17))


def test_gptq_keeps_the_scale_dtype_and_the_input_dtype_free():
    """A bf16 weight is computed in fp32; scales rounded to bf16 save losslessly."""
    W, H = _weight().to(torch.bfloat16), _hessian(_inputs())
    scheme = QuantScheme(4, 32, False)
    qw = quantize_gptq(W, H, scheme, scale_dtype=torch.bfloat16, act_order=True)
    assert qw.dequantized.dtype == torch.float32 and qw.values.dtype == torch.int8
    assert torch.equal(qw.scale.to(torch.bfloat16).float(), qw.scale)
    assert qw.compressed()["weight_scale"].dtype == torch.bfloat16
