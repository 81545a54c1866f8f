"""The LSTM autoencoder, shared by the trainer and the monitor."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in the artefact so the monitor rebuilds the same net."""

    window_length: int = 140
    n_features: int = 1
    embedding_dim: int = 32
    hidden_dim: int = 64
    num_layers: int = 1  # LSTM layers in each of the four stages

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__})


class LSTMAutoencoder(nn.Module):
    """Encoder: LSTM(features->hidden), LSTM(hidden->embedding), last state = embedding.
    Decoder: embedding repeated over time, LSTM(embedding->embedding), LSTM(embedding->hidden), Linear.

    Batch-first: (batch, window_length, n_features) in and out.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder_in = nn.LSTM(c.n_features, c.hidden_dim, c.num_layers, batch_first=True)
        self.encoder_out = nn.LSTM(c.hidden_dim, c.embedding_dim, c.num_layers, batch_first=True)
        self.decoder_in = nn.LSTM(c.embedding_dim, c.embedding_dim, c.num_layers, batch_first=True)
        self.decoder_out = nn.LSTM(c.embedding_dim, c.hidden_dim, c.num_layers, batch_first=True)
        self.output = nn.Linear(c.hidden_dim, c.n_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.encoder_in(x)
        _, (h, _) = self.encoder_out(x)
        embedding: torch.Tensor = h[-1]  # (batch, embedding_dim)
        return embedding

    def decode(self, embedding: torch.Tensor, length: int) -> torch.Tensor:
        x = embedding.unsqueeze(1).expand(-1, length, -1)
        x, _ = self.decoder_in(x)
        x, _ = self.decoder_out(x)
        out: torch.Tensor = self.output(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[1])
