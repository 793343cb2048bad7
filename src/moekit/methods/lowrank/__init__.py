"""Low-rank decomposition of experts: activation-aware truncated SVD (SVD-LLM / ASVD),
shared bases with low-rank deltas (D²-MoE), and rank allocation under a parameter budget."""
