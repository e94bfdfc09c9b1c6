"""The KOALA discriminator: is this next-token distribution the target's, given the target's hidden state?

It reads a distribution through two summaries of sane scale instead of the raw vocabulary-sized log-probabilities
(whose L1 norm is ~1e6 for a 49k vocabulary and which saturate both scores in Adam's first steps):
- the expected output embedding `p @ W_out` `(N, H)`: where the distribution's mass points in the target's own
  output-embedding space, so two distributions that prefer the same tokens look alike;
- its `top_k` largest probabilities, sorted `(N, top_k)`: how confident it is.
Together with the context feature that is `2H + top_k` inputs, so the discriminator is a few hundred thousand
parameters: comparable to a head (millions), not to a vocabulary-sized layer. Its depth follows the head's K, as in
the paper, and every linear layer is spectrally normalised, the standard GAN stabiliser.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.config import Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig(Config):
    """`num_layers` FC layers (1 to 3) on [context, expected output embedding, top-k probabilities]; `hidden_size`
    is their width; `top_k` how many sorted probabilities describe the distribution's shape."""

    section: ClassVar[str] = "discriminator"

    num_layers: int = 2
    hidden_size: int = 256
    top_k: int = 8

    def validate(self) -> None:
        if not 1 <= self.num_layers <= 3:
            self.fail("num_layers", f"must be 1, 2 or 3, got {self.num_layers}")
        if self.hidden_size < 1:
            self.fail("hidden_size", f"must be >= 1, got {self.hidden_size}")
        if self.top_k < 1:
            self.fail("top_k", f"must be >= 1, got {self.top_k}")


class Discriminator(nn.Module):
    """Scores (context feature `(N, H)`, distribution logits `(N, V)`) pairs; returns logits `(N,)` of "this came
    from the target". `output_rows` `(V, H)` is the frozen output embedding of the V tokens the logits cover."""

    def __init__(self, config: DiscriminatorConfig, *, output_rows: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        vocab_size, hidden_size = output_rows.shape
        self.top_k = min(config.top_k, vocab_size)
        # Frozen and not saved: the rows belong to the target (non-persistent, so DDP need not sync it either).
        self.register_buffer("output_rows", output_rows.detach(), persistent=False)
        widths = [2 * hidden_size + self.top_k] + [config.hidden_size] * (config.num_layers - 1) + [1]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(spectral_norm(nn.Linear(width_in, width_out)))
            if index < len(widths) - 2:
                layers.append(nn.LeakyReLU(0.2))
        self.classifier = nn.Sequential(*layers)

    def summarize(self, logits: torch.Tensor) -> torch.Tensor:
        """logits `(N, V)` -> [expected output embedding, sorted top-k probabilities] `(N, H + top_k)`.

        Shift-invariant in the logits (a softmax), bounded in scale whatever V is."""
        probs = torch.softmax(logits.float(), dim=-1)
        expected_embedding = probs @ self.output_rows.float()
        top_probs = probs.topk(self.top_k, dim=-1).values
        return torch.cat([F.layer_norm(expected_embedding, expected_embedding.shape[-1:]), top_probs], dim=-1)

    def forward(self, context: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """context `(N, H)`, logits `(N, V)` -> scores `(N,)`."""
        context = F.layer_norm(context.float(), context.shape[-1:])
        inputs = torch.cat([context, self.summarize(logits)], dim=-1)
        return self.classifier(inputs).squeeze(-1)
