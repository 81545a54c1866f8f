"""The scorer runs batches at a few padded sizes (memory stays bounded on CPU: oneDNN caches a kernel per input
shape), and the padding never changes a score."""

from __future__ import annotations

import numpy as np

from bench.scorer import untrained_artefact
from monitor.core.model import ModelConfig
from monitor.core.scoring import Scorer, padded_batch


def test_batches_are_padded_to_at_most_18_sizes_up_to_512_and_never_by_more_than_half():
    sizes = {n: padded_batch(n, 512) for n in range(1, 513)}
    assert len(set(sizes.values())) == 18
    assert all(n <= size <= max(n + 1, 1.5 * n) for n, size in sizes.items())
    assert padded_batch(600, 512) == 512 and padded_batch(64, 64) == 64 and padded_batch(40, 64) == 48


def test_padding_does_not_change_scores():
    scorer = Scorer(untrained_artefact(ModelConfig(embedding_dim=8, hidden_dim=16)), device="cpu", max_batch=64)
    windows = np.random.default_rng(0).normal(size=(70, scorer.window_length)).astype(np.float32)
    together = scorer.score(windows)  # a chunk of 64 and one of 6, padded to 6
    alone = np.concatenate([scorer.score(windows[i:i + 5]) for i in range(0, 70, 5)])  # padded to 6 each
    np.testing.assert_allclose(alone, together, rtol=1e-6)
