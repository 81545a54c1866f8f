"""The model and the training loop: shapes, learning, best-validation weights, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.core.model import LSTMAutoencoder, ModelConfig
from trainer.fit import l1_loss, train_autoencoder


def _waves(n: int, length: int = 30, features: int = 1, seed: int = 0) -> np.ndarray:
    """Sine windows with random frequency and phase: a small, learnable stand-in for beats."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 2 * np.pi, length)[None, :, None]
    freq = rng.uniform(1, 3, (n, 1, features))
    phase = rng.uniform(0, 3, (n, 1, features))
    return np.sin(t * freq + phase).astype(np.float32)


TINY = ModelConfig(window_length=30, embedding_dim=4, hidden_dim=8)


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("features, layers", [(1, 1), (3, 1), (2, 2)])
def test_output_shape_matches_input_across_batches_and_features(batch, features, layers):
    config = ModelConfig(window_length=25, n_features=features, embedding_dim=4, hidden_dim=8, num_layers=layers)
    model = LSTMAutoencoder(config)
    x = torch.randn(batch, 25, features)
    assert model(x).shape == (batch, 25, features)
    assert model.encode(x).shape == (batch, 4)


def test_loss_decreases_on_a_tiny_set():
    train, val = _waves(64), _waves(32, seed=1)
    result = train_autoencoder(train, val, TINY, epochs=25, batch_size=8, lr=0.01, seed=0, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    assert result.best_val_loss < result.history[0]["val_loss"]


def test_the_returned_weights_are_the_best_validation_epoch_not_the_last():
    train, val = _waves(64), _waves(32, seed=1)
    # A far too large, constant learning rate: validation loss rises again after a few epochs.
    result = train_autoencoder(train, val, TINY, epochs=10, batch_size=8, lr=1.0, lr_schedule="constant",
                               grad_clip=None, patience=100, seed=0, progress=False)
    val_losses = [h["val_loss"] for h in result.history]
    assert len(val_losses) == 10 and result.best_epoch < 10  # precondition: the last epoch is not the best
    assert val_losses[-1] > min(val_losses)
    model = LSTMAutoencoder(TINY)
    model.load_state_dict(result.state_dict)
    achieved = l1_loss(model, torch.from_numpy(val), 256)
    assert achieved == pytest.approx(min(val_losses), rel=1e-5)
    assert result.best_epoch == int(np.argmin(val_losses)) + 1


def test_early_stopping_and_time_limit():
    train, val = _waves(32), _waves(16, seed=1)
    stopped = train_autoencoder(train, val, TINY, epochs=50, batch_size=8, lr=1.0, lr_schedule="constant",
                                grad_clip=None, patience=2, seed=0, progress=False)
    assert stopped.stop_reason == "early_stopping"
    assert len(stopped.history) == stopped.best_epoch + 2
    capped = train_autoencoder(train, val, TINY, epochs=50, batch_size=8, max_seconds=0.0, seed=0, progress=False)
    assert capped.stop_reason == "time_limit" and len(capped.history) == 1


def test_training_is_deterministic_for_a_seed():
    train, val = _waves(32), _waves(16, seed=1)
    runs = [train_autoencoder(train, val, TINY, epochs=2, batch_size=8, seed=s, progress=False) for s in (3, 3, 4)]
    for name, tensor in runs[0].state_dict.items():
        assert torch.equal(tensor, runs[1].state_dict[name]), name
    assert any(not torch.equal(t, runs[2].state_dict[n]) for n, t in runs[0].state_dict.items())


def test_training_leaves_global_torch_settings_as_they_were():
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    train_autoencoder(_waves(8), _waves(8, seed=1), TINY, epochs=1, batch_size=8, threads=1, progress=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
