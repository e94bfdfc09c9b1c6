"""KOALA head training, Ray-free: batches, target features, the alternating generator/discriminator steps,
validation, and checkpoint state as plain tensors (safetensors, no pickle).

Which distribution each head learns, for a sequence with target features f_t (post-norm last hidden state):
- Medusa head i at position t predicts token t+2+i: its label is the target's distribution at position t+1+i.
- EAGLE at position t reads (f_t, token t+1), predicts f_{t+1}, and through the frozen LM head the target's
  distribution at position t+1 (token t+2).
A prediction is trained where the token it predicts is under the loss mask (a response token).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import TrainConfig
from pipeline.discriminator import Discriminator, DiscriminatorConfig
from pipeline.heads import EagleHead, MedusaHeads
from pipeline import losses

EVAL_DEPTH = 3


@dataclasses.dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) bool, False on padding
    features: torch.Tensor  # (B, T, H) target features


@dataclasses.dataclass
class Predictions:
    """Selected positions only (N of them): what the head predicted and what the target says."""

    draft_logits: torch.Tensor  # (N, V_draft)
    target_logits: torch.Tensor  # (N, V_draft), no grad
    context: torch.Tensor  # (N, H) the target feature the head read (the discriminator's condition)
    loss_feature: torch.Tensor | None = None


def _ones(rows: torch.Tensor) -> torch.Tensor:
    """A mask selecting every one of the (already selected) rows."""
    return torch.ones(rows.shape[0], device=rows.device)


def _shift_left(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x `(B, T, H)` -> y with y[:, t] = x[:, t + steps], zero-filled past the end; same shape."""
    return torch.cat([x[:, steps:], x.new_zeros(x.shape[0], min(steps, x.shape[1]), x.shape[2])], dim=1)


def pad_rows(rows: Sequence[dict[str, Any]], *, max_seq_len: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with `input_ids`/`loss_mask` lists -> right-padded `(B, T)` ids and bool mask (False on padding)."""
    width = min(max(len(r["input_ids"]) for r in rows), max_seq_len)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids = list(row["input_ids"])[:width]
        input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[index, : len(ids)] = torch.tensor(list(row["loss_mask"])[:width], dtype=torch.bool)
    return input_ids, loss_mask


@torch.no_grad()
def target_features(model: nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The frozen target's last hidden state `(B, T, H)` for right-padded ids (padding is never a label)."""
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.tensor([int(m.nonzero().max()) + 1 if m.any() else 1 for m in loss_mask])
    attention_mask[torch.arange(input_ids.shape[1])[None] >= lengths[:, None]] = 0
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    return output.hidden_states[-1]


class KoalaTrainer:
    """Alternates `g_steps` generator (head) steps and `d_steps` discriminator steps per training step.

    With adv_weight = 0 there is no discriminator and the head minimises the distillation loss alone.
    """

    def __init__(self, config: TrainConfig, *, head: nn.Module, target_model: nn.Module) -> None:
        self.config = config
        self.head = head
        self.head_module: MedusaHeads | EagleHead = getattr(head, "module", head)
        self.target_model = target_model
        output_weight = target_model.get_output_embeddings().weight.detach()
        draft_ids = self.head_module.vocabulary.draft_token_ids
        # Target logits in the draft vocabulary: rows of the frozen LM head (softmax over them renormalises the
        # target's distribution to the draft vocabulary, the only tokens the head can propose).
        self.target_rows = output_weight if draft_ids is None else output_weight[draft_ids]
        self.head_optimizer = torch.optim.AdamW(
            [p for p in head.parameters() if p.requires_grad], lr=config.head_lr
        )
        self.discriminator: nn.Module | None = None
        self.discriminator_optimizer = None
        if config.adv_weight > 0:
            disc_config = DiscriminatorConfig(
                num_layers=config.discriminator_layers, hidden_size=config.discriminator_hidden_size
            )
            self.discriminator = Discriminator(
                disc_config, hidden_size=output_weight.shape[1], vocab_size=self.target_rows.shape[0]
            ).to(device=output_weight.device, dtype=output_weight.dtype)
            self.discriminator_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=config.discriminator_lr)
        self.step = 0

    def wrap_discriminator(self, wrap) -> None:
        """Lets the Ray layer wrap the discriminator for DDP without this module knowing about Ray."""
        if self.discriminator is not None:
            self.discriminator = wrap(self.discriminator)

    def _target_logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.target_rows)

    def predict(self, batch: TrainBatch) -> Predictions:
        if isinstance(self.head_module, MedusaHeads):
            return self._predict_medusa(batch)
        return self._predict_eagle(batch)

    def _predict_medusa(self, batch: TrainBatch) -> Predictions:
        features, mask = batch.features, batch.loss_mask
        num_heads = self.head_module.config.num_heads
        # valid[i][b, t]: head i at position t predicts token t+2+i, which is a response token.
        valid = [F.pad(mask[:, 2 + i :], (0, 2 + i), value=False) for i in range(num_heads)]
        any_valid = torch.stack(valid).any(0)  # (B, T)
        all_logits = self.head(features[any_valid])  # (num_heads, N_any, V)
        draft, target, context = [], [], []
        for i in range(num_heads):
            keep = valid[i][any_valid]
            draft.append(all_logits[i][keep])
            target.append(self._target_logits(_shift_left(features, 1 + i)[valid[i]]))
            context.append(features[valid[i]])
        return Predictions(torch.cat(draft), torch.cat(target).detach(), torch.cat(context))

    def _predict_eagle(self, batch: TrainBatch) -> Predictions:
        features, ids, mask = batch.features, batch.input_ids, batch.loss_mask
        predicted = self.head(features[:, :-1], ids[:, 1:])  # (B, T-1, H): f_{t+1} predicted at t
        valid = F.pad(mask[:, 2:], (0, 1), value=False)  # (B, T-1): token t+2 is a response token
        predicted_valid = predicted[valid]
        true_next = features[:, 1:][valid]
        return Predictions(
            draft_logits=self.head_module.logits(predicted_valid),
            target_logits=self._target_logits(true_next).detach(),
            context=features[:, :-1][valid],
            loss_feature=losses.feature_loss(predicted_valid, true_next, _ones(true_next)),
        )

    def generator_step(self, batch: TrainBatch) -> dict[str, float]:
        self.head.train()
        predictions = self.predict(batch)
        everywhere = _ones(predictions.draft_logits)
        target_probs = torch.softmax(predictions.target_logits.float(), dim=-1)
        loss_distill = losses.distill_loss(predictions.draft_logits, target_probs, everywhere)
        if predictions.loss_feature is not None:
            loss_distill = loss_distill + self.config.feature_loss_weight * predictions.loss_feature
        loss_adv_g = torch.zeros((), device=loss_distill.device)
        if self.discriminator is not None:
            draft_scores = self.discriminator(predictions.context, predictions.draft_logits)
            loss_adv_g = losses.adversarial_generator_loss(draft_scores, everywhere)
        loss = losses.generator_loss(loss_distill, loss_adv_g, adv_weight=self.config.adv_weight)
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.head_optimizer.step()
        metrics = {"loss_distill": loss_distill.item(), "loss_g": loss.item()}
        if predictions.loss_feature is not None:
            metrics["loss_feature"] = predictions.loss_feature.item()
        if self.discriminator is not None:
            metrics["loss_adv_g"] = loss_adv_g.item()
        return metrics

    def discriminator_step(self, batch: TrainBatch) -> dict[str, float]:
        if self.discriminator is None:
            return {}
        with torch.no_grad():
            predictions = self.predict(batch)
        everywhere = _ones(predictions.draft_logits)
        draft_scores = self.discriminator(predictions.context, predictions.draft_logits.detach())
        target_scores = self.discriminator(predictions.context, predictions.target_logits)
        loss_adv_d = losses.discriminator_loss(draft_scores, target_scores, everywhere)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        loss_adv_d.backward()
        self.discriminator_optimizer.step()
        accuracy = losses.discriminator_accuracy(draft_scores.detach(), target_scores.detach(), everywhere)
        return {"loss_adv_d": float(loss_adv_d), "d_accuracy": float(accuracy)}

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for _ in range(self.config.g_steps):
            metrics.update(self.generator_step(batch))
        for _ in range(self.config.d_steps if self.discriminator is not None else 0):
            metrics.update(self.discriminator_step(batch))
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: Iterable[TrainBatch]) -> dict[str, float | None]:
        """Validation: conditional top-1 accuracy at draft positions 1..3 (a proxy for n-alpha) against the
        target's greedy token, the distillation loss, and the discriminator's accuracy."""
        self.head.eval()
        correct = torch.zeros(EVAL_DEPTH)
        reached = torch.zeros(EVAL_DEPTH)
        loss_total = positions = 0.0
        d_correct = d_total = 0.0
        for batch in batches:
            hits = self._greedy_hits(batch)  # (EVAL_DEPTH, N) bool, -1 where not evaluable
            chain_alive = torch.ones(hits.shape[1], dtype=torch.bool, device=hits.device)
            for depth in range(EVAL_DEPTH):
                evaluable = chain_alive & (hits[depth] >= 0)
                reached[depth] += evaluable.sum().item()
                correct[depth] += (evaluable & (hits[depth] == 1)).sum().item()
                chain_alive = evaluable & (hits[depth] == 1)
            predictions = self.predict(batch)
            count = len(predictions.draft_logits)
            if count:
                everywhere = _ones(predictions.draft_logits)
                target_probs = torch.softmax(predictions.target_logits.float(), dim=-1)
                loss_total += float(losses.distill_loss(predictions.draft_logits, target_probs, everywhere)) * count
                positions += count
                if self.discriminator is not None:
                    draft_scores = self.discriminator(predictions.context, predictions.draft_logits)
                    target_scores = self.discriminator(predictions.context, predictions.target_logits)
                    d_correct += float(losses.discriminator_accuracy(draft_scores, target_scores, everywhere)) * count
                    d_total += count
        metrics: dict[str, float | None] = {
            f"val_acc_{depth + 1}": float(correct[depth] / reached[depth]) if reached[depth] else None
            for depth in range(EVAL_DEPTH)
        }
        metrics["val_loss_distill"] = loss_total / positions if positions else None
        metrics["val_d_accuracy"] = d_correct / d_total if d_total else None
        return metrics

    def _greedy_hits(self, batch: TrainBatch) -> torch.Tensor:
        """(EVAL_DEPTH, B*T) with 1 = the head's top-1 at depth d from position t equals the target's greedy token,
        0 = it does not, -1 = not evaluable (the token is not a response token)."""
        features, ids, mask = batch.features, batch.input_ids, batch.loss_mask
        batch_size, length, _ = features.shape
        target_greedy = self.target_model.get_output_embeddings()(features).argmax(-1)  # (B, T): token t+1
        hits = torch.full((EVAL_DEPTH, batch_size, length), -1, dtype=torch.long, device=features.device)
        vocabulary = self.head_module.vocabulary
        to_target = (lambda x: x) if vocabulary.draft_token_ids is None else (lambda x: vocabulary.draft_token_ids[x])
        if isinstance(self.head_module, MedusaHeads):
            logits = self.head_module(features)  # (num_heads, B, T, V)
            for depth in range(min(EVAL_DEPTH, logits.shape[0])):
                span = length - 2 - depth
                if span <= 0:
                    continue
                guess = to_target(logits[depth, :, :span].argmax(-1))
                truth = target_greedy[:, 1 + depth : 1 + depth + span]
                evaluable = mask[:, 2 + depth : 2 + depth + span]
                hits[depth, :, :span] = torch.where(evaluable, (guess == truth).long(), -1)
            return hits.flatten(1)
        # EAGLE unrolled: depth d feeds the head its own predicted features from depth d-1 (all context positions
        # predicted, so this is a slightly pessimistic proxy of real chain drafting).
        step_features = features[:, :-1]
        for depth in range(EVAL_DEPTH):
            span = length - 2 - depth
            if span <= 0:
                break
            predicted = self.head_module(step_features[:, :span], ids[:, 1 + depth : 1 + depth + span])
            guess = to_target(self.head_module.logits(predicted).argmax(-1))
            truth = target_greedy[:, 1 + depth : 1 + depth + span]
            evaluable = mask[:, 2 + depth : 2 + depth + span]
            hits[depth, :, :span] = torch.where(evaluable, (guess == truth).long(), -1)
            step_features = predicted
        return hits.flatten(1)

    # --- checkpoint state as flat tensors + JSON (safetensors: nothing is unpickled on resume) ---

    def save_state(self, directory: Path) -> None:
        tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in self.head_module.state_dict().items()}
        tensors.update(_optimizer_tensors("head_optimizer", self.head_optimizer))
        if self.discriminator is not None:
            disc = getattr(self.discriminator, "module", self.discriminator)
            tensors.update({f"disc.{k}": v.detach().contiguous().cpu() for k, v in disc.state_dict().items()})
            tensors.update(_optimizer_tensors("disc_optimizer", self.discriminator_optimizer))
        save_file(tensors, directory / "trainer_state.safetensors")
        (directory / "trainer_state.json").write_text(json.dumps({"step": self.step}))

    def load_state(self, directory: Path) -> None:
        tensors = load_file(directory / "trainer_state.safetensors")
        self.head_module.load_state_dict(_with_prefix(tensors, "head."))
        _load_optimizer(self.head_optimizer, tensors, "head_optimizer")
        if self.discriminator is not None:
            getattr(self.discriminator, "module", self.discriminator).load_state_dict(_with_prefix(tensors, "disc."))
            _load_optimizer(self.discriminator_optimizer, tensors, "disc_optimizer")
        self.step = json.loads((directory / "trainer_state.json").read_text())["step"]


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {
        f"{name}.{index}.{key}": (value if torch.is_tensor(value) else torch.tensor(value)).detach().contiguous().cpu()
        for index, entries in state.items()
        for key, value in entries.items()
    }


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], name: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _with_prefix(tensors, f"{name}.").items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def iterate_batches(
    rows: Sequence[dict[str, Any]], *, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> Iterator[list[int]]:
    """Row indices per batch; the order is a function of (seed, epoch) so a resumed run sees the same batches."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(rows), generator=generator).tolist()
    else:
        order = list(range(len(rows)))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
