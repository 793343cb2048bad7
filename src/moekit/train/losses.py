"""Router losses and the aux-loss-free bias update, as pure functions of routing tensors.

Notation: T tokens, E experts, k experts chosen per token. ``logits`` [T, E] are the raw
router logits, ``top_k_index`` [T, k] the experts actually chosen. The trainer adds
each loss to the language-model loss with an explicit coefficient; nothing here depends
on a model output flag.
"""

from __future__ import annotations

import torch


def expert_load(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f_j: the fraction of the T·k routing slots that went to expert j. [T, k] -> [E].

    Sums to 1; perfectly balanced routing gives 1/E everywhere.
    """
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).to(torch.float32)
    return counts / max(top_k_index.numel(), 1)


def router_probabilities(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """P(expert | token) [T, E] for the balance loss.

    Softmax routers use their softmax. Sigmoid routers (DeepSeek-V3) have independent
    scores; as in DeepSeek-V3's sequence-wise balance loss (DeepSeek-AI 2024,
    arXiv 2412.19437, eq. 17-20) they are normalised to sum to one per token.
    """
    logits = logits.float()
    if scoring == "sigmoid":
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)
    return logits.softmax(dim=-1)


def load_balancing_loss(probs: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, arXiv 2101.03961, eq. 4):

        L_aux = E · Σ_j f_j · P_j,   P_j = mean_t p_j(x_t)

    with f_j from `expert_load` (normalised by T·k, so the loss is 1 at perfect balance
    for any k). f is a count and carries no gradient; the gradient flows through P and
    pushes probability away from over-used experts: with ``logits`` z,
    dL/dz_tm = (E/T) · p_tm · (f_m − Σ_j f_j p_tj).

    Args:
        probs: [T, E] router probabilities (`router_probabilities`).
        top_k_index: [T, k] chosen experts.
    Returns:
        a scalar tensor.
    """
    num_experts = probs.shape[-1]
    load = expert_load(top_k_index, num_experts).to(probs.dtype)
    return num_experts * torch.sum(load * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, arXiv 2202.08906, eq. 5):

        L_z = mean_t (log Σ_j exp z_tj)²

    It keeps logits small, which keeps the softmax (and bf16 inference) stable;
    dL/dz_tm = (2/T) · lse_t · softmax(z_t)_m. ``logits`` [T, E] -> scalar.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@torch.no_grad()
def aux_free_bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3):

        b_j ← b_j + γ · sign(mean(load) − load_j)

    ``bias`` [E] is the selection-only correction bias (``e_score_correction_bias``):
    it shifts which experts are chosen but not their weights, so no gradient is
    involved. Under-loaded experts become more attractive, over-loaded ones less.
    ``load`` [E] is any load measure (counts or fractions). Updates ``bias`` in place
    and returns it.
    """
    load = load.to(bias.dtype)
    return bias.add_(gamma * torch.sign(load.mean() - load))


def load_imbalance(load: torch.Tensor) -> torch.Tensor:
    """max_j f_j / mean_j f_j: 1 when balanced, E when one expert takes everything."""
    return load.max() / load.mean().clamp(min=1e-12)
