"""Ranking metrics on `(n, 39)` logits against multi-hot targets, vectorized (DESIGN §3).

- recall@k: share of an event's true parts among the k highest-ranked parts, averaged.
- hit@k: share of events with at least one true part in the top k.
- mrr: mean of 1 / rank of the best-ranked true part (rank 1 = highest logit).
"""

from __future__ import annotations

from math import comb

import torch

from c5snn.data import N_PARTS, N_PICKS

METRIC_KEYS = ("recall_at_5", "recall_at_20", "hit_at_5", "hit_at_20", "mrr")


def per_window_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each metric per window: `(n,)` tensors (what bootstrap intervals resample)."""
    order = logits.argsort(dim=1, descending=True)  # (n, 39) parts by rank
    hits = targets.gather(1, order)  # (n, 39) 1 where the part at that rank is true
    n_true = targets.sum(dim=1).clamp(min=1)  # (n,)
    top5 = hits[:, :5].sum(dim=1)
    top20 = hits[:, :20].sum(dim=1)
    first = hits.argmax(dim=1).to(logits.dtype) + 1  # (n,) rank of the best-ranked true part
    return {
        "recall_at_5": top5 / n_true,
        "recall_at_20": top20 / n_true,
        "hit_at_5": (top5 > 0).to(logits.dtype),
        "hit_at_20": (top20 > 0).to(logits.dtype),
        "mrr": 1.0 / first,
    }


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The five metrics averaged over windows, as Python floats."""
    per = per_window_metrics(logits.float(), targets.float())
    means = torch.stack([per[k].mean() for k in METRIC_KEYS]).tolist()  # one device sync
    return dict(zip(METRIC_KEYS, means, strict=True))


def chance_metrics(n_parts: int = N_PARTS, n_true: int = N_PICKS) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking (e.g. recall@20 = 20/39)."""

    def miss_all(k: int) -> float:  # P(no true part among the top k)
        return comb(n_parts - k, n_true) / comb(n_parts, n_true)

    # P(best true rank = r) = C(n_parts - r, n_true - 1) / C(n_parts, n_true)
    mrr = sum(
        comb(n_parts - r, n_true - 1) / comb(n_parts, n_true) / r
        for r in range(1, n_parts - n_true + 2)
    )
    return {
        "recall_at_5": 5 / n_parts,
        "recall_at_20": 20 / n_parts,
        "hit_at_5": 1 - miss_all(5),
        "hit_at_20": 1 - miss_all(20),
        "mrr": mrr,
    }
