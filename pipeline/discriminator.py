"""The KOALA discriminator: is this next-token distribution the target's, given the target's hidden state?"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig(Config):
    """`num_layers` FC layers (1 to 3) on [mapped hidden state, log-probabilities]; `hidden_size` is their width."""

    section: ClassVar[str] = "discriminator"

    num_layers: int = 2
    hidden_size: int = 256

    def validate(self) -> None:
        if not 1 <= self.num_layers <= 3:
            self.fail("num_layers", f"must be 1, 2 or 3, got {self.num_layers}")
        if self.hidden_size < 1:
            self.fail("hidden_size", f"must be >= 1, got {self.hidden_size}")


class Discriminator(nn.Module):
    """Maps the target hidden state `(N, H)` to the logits' dimension V, concatenates the token log-probabilities
    `(N, V)`, and scores the pair with FC layers. Returns logits `(N,)` of "this came from the target".

    Log-probabilities rather than raw logits: raw logits carry an arbitrary per-position offset that would let the
    discriminator separate draft from target without looking at the distribution.
    """

    def __init__(self, config: DiscriminatorConfig, *, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.hidden_to_vocab = nn.Linear(hidden_size, vocab_size)
        widths = [2 * vocab_size] + [config.hidden_size] * (config.num_layers - 1) + [1]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < len(widths) - 2:
                layers.append(nn.LeakyReLU(0.2))
        self.classifier = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """hidden `(N, H)`, logits `(N, V)` -> scores `(N,)`."""
        log_probs = F.log_softmax(logits.float(), dim=-1).to(hidden.dtype)
        return self.classifier(torch.cat([self.hidden_to_vocab(hidden), log_probs], dim=-1)).squeeze(-1)
