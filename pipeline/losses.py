"""KOALA training losses as pure functions of tensors (no modules, no state).

Discriminator outputs are taken as logits s with D = sigmoid(s), so -log D = softplus(-s) and
-log(1 - D) = softplus(s), which stay finite where D saturates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def distill_loss(draft_logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft-label cross-entropy -sum_v p_target(v) log p_draft(v), a weighted mean over positions.

    draft_logits `(N, V)`, target_probs `(N, V)` (the target's next-token distribution over the head's vocabulary:
    the trainer renormalises it to a draft vocabulary where the head has one), mask `(N,)`: 0/1 flags or per-row
    weights (the trainer's decay per unrolled depth).
    """
    cross_entropy = -(target_probs * F.log_softmax(draft_logits.float(), dim=-1)).sum(dim=-1)
    return _masked_mean(cross_entropy, mask)


def feature_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """EAGLE's feature regression: smooth L1 between predicted and target features `(N, H)`, masked mean."""
    per_position = F.smooth_l1_loss(predicted.float(), target.float(), reduction="none").mean(dim=-1)
    return _masked_mean(per_position, mask)


def adversarial_generator_loss(draft_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E[-log D(draft)]: the head is rewarded for logits the discriminator takes for the target's. `(N,)`"""
    return _masked_mean(F.softplus(-draft_scores.float()), mask)


def discriminator_loss(
    draft_scores: torch.Tensor, target_scores: torch.Tensor, mask: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """L_D = E[-log(1 - D(draft))] + E[-log D(target)]. Scores `(N,)` are discriminator logits.

    `label_smoothing` eps > 0 is one-sided label smoothing (a GAN stabiliser): the target's label is 1 - eps, so
    its term becomes E[-(1 - eps) log D(target) - eps log(1 - D(target))]; eps = 0 is the paper's formula."""
    target_term = (1 - label_smoothing) * F.softplus(-target_scores.float())
    if label_smoothing:
        target_term = target_term + label_smoothing * F.softplus(target_scores.float())
    return _masked_mean(F.softplus(draft_scores.float()), mask) + _masked_mean(target_term, mask)


def generator_loss(loss_distill: torch.Tensor, loss_adv_g: torch.Tensor, *, adv_weight: float) -> torch.Tensor:
    """L_G = lambda * E[-log D(draft)] + L_distill. lambda = 0 is exactly the plain distillation loss."""
    if adv_weight == 0:
        return loss_distill
    return adv_weight * loss_adv_g + loss_distill


def discriminator_accuracy(draft_scores: torch.Tensor, target_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of correct calls: target logits scored > 0, draft logits scored < 0 (balanced over both)."""
    correct = ((target_scores > 0).float() + (draft_scores < 0).float()) / 2
    return _masked_mean(correct, mask)
