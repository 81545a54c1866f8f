"""The training loop: L1 loss, Adam, early stopping on validation loss, best weights kept.

Seeded and deterministic on CPU: the same seed, data and settings give the same weights.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from monitor.core.model import LSTMAutoencoder, ModelConfig


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]  # weights of the best validation epoch
    best_epoch: int  # 1-based
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)  # epoch, train_loss, val_loss, seconds
    fit_seconds: float = 0.0
    stop_reason: str = "epochs"  # "epochs", "early_stopping" or "time_limit"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch CPU ops on `threads` threads for the duration (None: leave as is)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def deterministic(seed: int, threads: int | None) -> Iterator[None]:
    """Seed torch and ask for deterministic kernels for the duration; restore afterwards."""
    previous_mode = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(previous_mode)


def l1_loss(model: nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """Mean absolute reconstruction error over x, evaluated in batches."""
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size]
            total += (model(batch) - batch).abs().mean().item() * len(batch)
    return total / len(x)


def init_forget_bias(model: nn.Module, value: float) -> None:
    """Start every LSTM's forget gate at `value` (Jozefowicz et al., 2015). PyTorch's default
    (~0) halves the memory each step, so over a 140-sample beat the embedding at first carries
    almost nothing of the beat's start and training idles on the average beat for many epochs."""
    for module in model.modules():
        if isinstance(module, nn.LSTM):
            h = module.hidden_size
            for name, param in module.named_parameters():
                if name.startswith("bias_"):  # gate order (input, forget, cell, output)
                    with torch.no_grad():
                        param[h:2 * h] = value / 2  # bias_ih + bias_hh = value


def train_one_epoch(model: nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, batch_size: int,
                    order: torch.Generator, grad_clip: float | None) -> float:
    """One pass over x in a seeded random order; returns the mean L1 training loss."""
    model.train()
    total = 0.0
    for rows in torch.randperm(len(x), generator=order).split(batch_size):
        batch = x[rows.to(x.device)]
        loss = nn.functional.l1_loss(model(batch), batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:  # LSTMs occasionally spike; clipping keeps a large lr stable
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimiser.step()
        total += loss.item() * len(batch)
    return total / len(x)


def train_autoencoder(train: np.ndarray, val: np.ndarray, config: ModelConfig, *, epochs: int = 50,
                      batch_size: int = 16, lr: float = 3e-3, patience: int = 10, seed: int = 42,
                      lr_schedule: str = "cosine", grad_clip: float | None = 1.0, device: str = "cpu",
                      threads: int | None = 1, max_seconds: float | None = None,
                      forget_bias: float | None = 3.0,
                      progress: bool = True,
                      augment: Callable[[np.ndarray, int], np.ndarray] | None = None) -> FitResult:
    """Fit on `train` (normalised float32 windows), select on `val`; returns the best weights.
    `augment(train, epoch)`, when given, draws a fresh augmented copy of the training set each epoch."""
    device_ = torch.device(device)
    with deterministic(seed, threads):
        model = LSTMAutoencoder(config)
        if forget_bias is not None:
            init_forget_bias(model, forget_bias)
        model.to(device_)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        # Cosine decay over the epoch budget: a large lr early escapes the "average beat" plateau
        # sooner; the small lr late settles the noisy LSTM updates.
        schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
                    if lr_schedule == "cosine" else None)
        x_train = torch.as_tensor(train, dtype=torch.float32, device=device_)
        x_val = torch.as_tensor(val, dtype=torch.float32, device=device_)
        order = torch.Generator().manual_seed(seed)  # batch order, independent of init
        result = FitResult(copy.deepcopy(model.state_dict()), 0, float("inf"))
        started = time.perf_counter()
        bar = tqdm(range(1, epochs + 1), desc="fit", unit="epoch", disable=not progress, dynamic_ncols=True)
        for epoch in bar:
            epoch_start = time.perf_counter()
            x_epoch = (x_train if augment is None else
                       torch.as_tensor(augment(train, epoch), dtype=torch.float32, device=device_))
            train_loss = train_one_epoch(model, optimiser, x_epoch, batch_size, order, grad_clip)
            if schedule is not None:
                schedule.step()
            val_loss = l1_loss(model, x_val, max(batch_size, 256))
            result.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                   "seconds": time.perf_counter() - epoch_start})
            if val_loss < result.best_val_loss:
                result.best_val_loss, result.best_epoch = val_loss, epoch
                result.state_dict = copy.deepcopy(model.state_dict())
            bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}",
                            best=f"{result.best_val_loss:.4f}@{result.best_epoch}")
            if epoch - result.best_epoch >= patience:
                result.stop_reason = "early_stopping"
                break
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                result.stop_reason = "time_limit"
                break
        bar.close()
        result.fit_seconds = time.perf_counter() - started
        result.state_dict = {k: v.detach().cpu() for k, v in result.state_dict.items()}
    return result
