from math import comb

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from c5snn.metrics import chance_metrics, compute_metrics


def brute_force(logits: np.ndarray, targets: np.ndarray) -> dict:
    out = {k: [] for k in ("recall_at_5", "recall_at_20", "hit_at_5", "hit_at_20", "mrr")}
    for row, true in zip(logits, targets, strict=True):
        ranked = sorted(range(39), key=lambda j: -row[j])
        truth = {j for j in range(39) if true[j]}
        for k in (5, 20):
            found = len(truth & set(ranked[:k]))
            out[f"recall_at_{k}"].append(found / len(truth))
            out[f"hit_at_{k}"].append(float(found > 0))
        out["mrr"].append(1 / (min(ranked.index(j) for j in truth) + 1))
    return {k: float(np.mean(v)) for k, v in out.items()}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_vectorized_metrics_equal_per_sample_definition(n, seed):
    rng = np.random.default_rng(seed)
    logits = np.stack([rng.permutation(39) for _ in range(n)]).astype(np.float32)  # tie-free
    targets = np.zeros((n, 39), dtype=np.float32)
    for i in range(n):
        targets[i, rng.choice(39, size=5, replace=False)] = 1
    got = compute_metrics(torch.from_numpy(logits), torch.from_numpy(targets))
    want = brute_force(logits, targets)
    for key in want:
        assert abs(got[key] - want[key]) < 1e-6, key


def test_chance_levels_are_exact_and_match_simulation():
    chance = chance_metrics()
    assert chance["recall_at_20"] == 20 / 39
    assert chance["hit_at_20"] == 1 - comb(19, 5) / comb(39, 5)
    assert round(chance["hit_at_20"], 4) == 0.9798
    gen = torch.Generator().manual_seed(0)
    logits = torch.rand(200_000, 39, generator=gen)
    targets = torch.zeros(200_000, 39)
    targets[:, :5] = 1  # random logits make any fixed truth a uniformly random ranking
    sim = compute_metrics(logits, targets)
    for key, value in chance.items():
        assert abs(sim[key] - value) < 0.004, key
