"""KOALA head training, Ray-free: batches, target features, the alternating generator/discriminator steps,
validation (a tau estimate), the training loop, and checkpoint state as plain tensors (safetensors, no pickle).

Which distribution each head learns, for a sequence with target features f_t (post-norm last hidden state):
- Medusa head i at position t predicts token t+2+i: its label is the target's distribution at position t+1+i.
- EAGLE at position t reads (f_t, token t+1), predicts f_{t+1}, and through the frozen LM head the target's
  distribution at position t+1 (token t+2). With training-time test (`unroll_depth` > 1) it is also trained at
  draft steps 2.. reading its own predicted features, exactly as chain drafting runs it.
A prediction is trained where the token it predicts is under the loss mask (a response token), and, for a chain,
where the chain's first drafted token is one too (decoding drafts only inside the response).
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pipeline import losses
from pipeline.config import LOSS_CURVE_POINTS, TrainConfig
from pipeline.discriminator import Discriminator, DiscriminatorConfig
from pipeline.heads import EagleHead, LogitShape, MedusaHeads, head_input_features
from pipeline.trees import build_static_tree

GREEDY_CHUNK = 4096  # positions per full-vocabulary argmax (bounds memory on long validation batches)
TREE_RANKS = 4  # draft ranks per step whose accuracy validation measures (for static trees)
# The static tree stored with an exported head; decoding drafts its best prefix for the device (a 2-core CPU 7-15
# nodes, a GPU the whole tree: on MT-bench the shipped head's 64-path tree at depth 6 reached tau 3.11 against
# 2.86 for its first 24 paths at depth 4, README "Tree drafts").
STATIC_TREE_NODES = 64


@dataclasses.dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) bool, False on padding
    features: torch.Tensor  # (B, T, H) target features ((B, T, (1 + n) H) for a head fusing n extra layers)
    # (B, T) the target's greedy token after each position, when known (validation computes it once, not per epoch)
    target_greedy: torch.Tensor | None = None


@dataclasses.dataclass
class Predictions:
    """Selected (position, draft step) rows only, N of them: what the head predicted and what the target says."""

    draft_logits: torch.Tensor  # (N, V_draft)
    target_logits: torch.Tensor  # (N, V_draft), no grad
    context: torch.Tensor  # (N, H) the target feature at the predicting position (the discriminator's condition)
    weights: torch.Tensor  # (N,) loss weight of each row (depth_loss_decay ** draft step)
    predicted_features: torch.Tensor | None = None  # (N, H) EAGLE only
    true_features: torch.Tensor | None = None  # (N, H)


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
def target_features(model: nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                    extra_layers: Sequence[int] = ()) -> torch.Tensor:
    """The frozen target's features for right-padded ids (padding is never a label), on the target's device
    whatever device the ids come from: the last hidden state `(B, T, H)`, or with `extra_layers` the fused head's
    input `(B, T, (1 + n) H)` (`head_input_features`)."""
    device = next(model.parameters()).device
    input_ids, loss_mask = input_ids.to(device), loss_mask.to(device)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.tensor([int(m.nonzero().max()) + 1 if m.any() else 1 for m in loss_mask], device=input_ids.device)
    attention_mask[torch.arange(input_ids.shape[1], device=input_ids.device)[None] >= lengths[:, None]] = 0
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    return head_input_features(output.hidden_states, extra_layers)


def row_length(row: dict[str, Any], max_seq_len: int) -> int:
    return min(len(row["input_ids"]), max_seq_len)


def rows_fingerprint(rows: Sequence[dict[str, Any]], max_seq_len: int) -> str:
    """A hash of the rows' token ids in order, as the features see them (cut to `max_seq_len`)."""
    digest = hashlib.sha1(str(max_seq_len).encode())
    for row in rows:
        ids = row["input_ids"][:max_seq_len]
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(array.array("q", ids).tobytes())
    return digest.hexdigest()


class FeatureStore:
    """The frozen target's features for a list of rows, computed once: one flat `(total_tokens, W)` fp16 tensor
    (on the training device, so a batch is one gather) and each row's offset; W = H, or (1 + n) H for a head
    that fuses n extra layers."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, *, max_seq_len: int):
        self.flat, self.offsets, self.lengths, self.max_seq_len = flat, offsets, lengths, max_seq_len

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, rows: Sequence[dict[str, Any]], *, max_seq_len: int, batch_tokens: int = 0,
              progress: bool = True, extra_layers: Sequence[int] = ()) -> FeatureStore:
        device = model.device
        batch_tokens = batch_tokens or (16384 if device.type == "cuda" else 4096)
        lengths = torch.tensor([row_length(r, max_seq_len) for r in rows], dtype=torch.long)
        offsets = torch.cumsum(lengths, 0) - lengths
        width = model.get_output_embeddings().weight.shape[1] * (1 + len(extra_layers))
        flat = torch.zeros(int(lengths.sum()), width, dtype=torch.float16, device=device)
        order = sorted(range(len(rows)), key=lambda i: int(lengths[i]))  # similar lengths share a batch: no waste
        chunks, chunk = [], []
        for index in order:
            if chunk and (len(chunk) + 1) * int(lengths[index]) > batch_tokens:
                chunks.append(chunk)
                chunk = []
            chunk.append(index)
        if chunk:
            chunks.append(chunk)
        bar = tqdm(total=int(lengths.sum()), desc="target features", unit="tok", disable=not progress, mininterval=5)
        for chunk in chunks:
            input_ids, loss_mask = pad_rows([rows[i] for i in chunk], max_seq_len=max_seq_len)
            hidden = target_features(model, input_ids.to(device), torch.ones_like(loss_mask), extra_layers)
            for slot, index in enumerate(chunk):
                start, length = int(offsets[index]), int(lengths[index])
                flat[start : start + length] = hidden[slot, :length].to(torch.float16)
            bar.update(sum(int(lengths[i]) for i in chunk))
        bar.close()
        return cls(flat, offsets, lengths, max_seq_len=max_seq_len)

    def save(self, path: Path, *, rows: Sequence[dict[str, Any]]) -> None:
        """Saves the features with the fingerprint of the `rows` they were computed for (`rows_fingerprint`)."""
        from pipeline.data import atomic_path

        with atomic_path(path) as temporary:
            save_file({"flat": self.flat.cpu().contiguous(), "offsets": self.offsets, "lengths": self.lengths,
                       "max_seq_len": torch.tensor(self.max_seq_len)}, temporary,
                      metadata={"rows": rows_fingerprint(rows, self.max_seq_len)})

    @classmethod
    def load(cls, path: Path, *, device: torch.device, rows: Sequence[dict[str, Any]],
             max_seq_len: int) -> FeatureStore | None:
        """The saved features, or None when they were computed for other rows (or another `max_seq_len`): a
        Ray worker's shard of the data may hold other rows after a restart, and a cache read against the wrong
        rows would train on another row's features without any error."""
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("rows") != rows_fingerprint(rows, max_seq_len):
                return None
        tensors = load_file(path)
        return cls(tensors["flat"].to(device), tensors["offsets"], tensors["lengths"],
                   max_seq_len=int(tensors["max_seq_len"]))

    def batch(self, rows: Sequence[dict[str, Any]], indices: Sequence[int], *, dtype: torch.dtype) -> TrainBatch:
        device = self.flat.device
        input_ids, loss_mask = pad_rows([rows[i] for i in indices], max_seq_len=self.max_seq_len)
        index = torch.tensor(list(indices))
        lengths, offsets = self.lengths[index], self.offsets[index]
        positions = torch.arange(input_ids.shape[1])
        gather = offsets[:, None] + torch.minimum(positions[None], lengths[:, None] - 1)  # (B, T)
        features = self.flat[gather.to(device)].to(dtype)
        features = features * (positions[None] < lengths[:, None]).to(device=device, dtype=dtype)[..., None]
        return TrainBatch(input_ids=input_ids.to(device), loss_mask=loss_mask.to(device), features=features)


class LiveFeatures:
    """Features recomputed by the frozen target for every batch (data too large to cache)."""

    def __init__(self, model: nn.Module, *, max_seq_len: int, extra_layers: Sequence[int] = ()):
        self.model, self.max_seq_len, self.extra_layers = model, max_seq_len, tuple(extra_layers)

    def batch(self, rows: Sequence[dict[str, Any]], indices: Sequence[int], *, dtype: torch.dtype) -> TrainBatch:
        input_ids, loss_mask = pad_rows([rows[i] for i in indices], max_seq_len=self.max_seq_len)
        input_ids, loss_mask = input_ids.to(self.model.device), loss_mask.to(self.model.device)
        features = target_features(self.model, input_ids, torch.ones_like(loss_mask), self.extra_layers).to(dtype)
        return TrainBatch(input_ids=input_ids, loss_mask=loss_mask, features=features)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None = plain fp32. Master weights stay fp32 regardless."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return None if precision == "float32" else getattr(torch, precision)


def lr_multiplier(progress: float, *, warmup_fraction: float, schedule: str, min_ratio: float) -> float:
    """The learning-rate factor at `progress` in [0, 1] of training: linear warm-up over the first
    `warmup_fraction`, then `schedule` decay from 1 to `min_ratio` at the end."""
    if progress < warmup_fraction:
        return progress / warmup_fraction
    if schedule == "constant":
        return 1.0
    rest = min(1.0, (progress - warmup_fraction) / max(1e-9, 1 - warmup_fraction))
    shape = 0.5 * (1 + math.cos(math.pi * rest)) if schedule == "cosine" else 1 - rest
    return min_ratio + (1 - min_ratio) * shape


def _shift_right(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """mask `(B, L)` -> m with m[:, p] = mask[:, p - steps], False where p < steps."""
    if steps == 0:
        return mask
    return F.pad(mask[:, :-steps], (steps, 0), value=False) if steps < mask.shape[1] else torch.zeros_like(mask)


def _shift_left(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x `(B, T, ...)` -> y with y[:, t] = x[:, t + steps], zero/False past the end; same shape."""
    if steps == 0:
        return x
    tail = x.new_zeros((x.shape[0], min(steps, x.shape[1]), *x.shape[2:]))
    return torch.cat([x[:, steps:], tail], dim=1)


def _rank_of(logits: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """logits `(..., V)`, wanted draft indices `(...)` (-1: none) -> how many logits beat the wanted one `(...)`;
    V where there is no wanted token."""
    safe = wanted.clamp_min(0)
    rank = (logits > logits.gather(-1, safe[..., None])).sum(-1)
    return torch.where(wanted >= 0, rank, logits.shape[-1])


class KoalaTrainer:
    """Alternates `g_steps` generator (head) steps and `d_steps` discriminator steps per training step.

    With adv_weight = 0 there is no discriminator and the head minimises the distillation loss alone. The head's
    parameters are fp32 master weights; forward passes run under autocast when `precision` asks for it.
    `total_steps` sets the learning-rate schedule's length (0: no decay after warm-up).
    """

    def __init__(self, config: TrainConfig, *, head: nn.Module, target_model: nn.Module, total_steps: int = 0):
        self.config = config
        self.head = head
        self.head_module: MedusaHeads | EagleHead = getattr(head, "module", head)
        self.target_model = target_model
        self.device = target_model.get_output_embeddings().weight.device
        self.autocast_dtype = autocast_dtype(config.precision, self.device)
        output_weight = target_model.get_output_embeddings().weight.detach()
        self.full_output_weight = output_weight
        draft_ids = self.head_module.vocabulary.draft_token_ids
        # Target logits in the draft vocabulary: rows of the frozen LM head (softmax over them renormalises the
        # target's distribution to the draft vocabulary, the only tokens the head can propose).
        self.target_rows = output_weight if draft_ids is None else output_weight[draft_ids]
        self.logit_shape = LogitShape.of(target_model, draft_ids)
        self.full_logit_shape = LogitShape.of(target_model)
        self.total_steps = total_steps
        self.step = 0
        self.train_seconds = 0.0
        self.head_optimizer = torch.optim.AdamW(
            [p for p in head.parameters() if p.requires_grad], lr=config.head_lr, betas=(0.9, 0.95),
            weight_decay=config.weight_decay,
        )

        def multiplier(step: int) -> float:  # a plain function: LambdaLR's state_dict cannot hold a bound method
            progress = self.progress(step)
            if progress is None:
                return 1.0
            return lr_multiplier(progress, warmup_fraction=config.warmup_fraction, schedule=config.lr_schedule,
                                 min_ratio=config.min_lr_ratio)

        self.head_scheduler = torch.optim.lr_scheduler.LambdaLR(self.head_optimizer, multiplier)
        # fp16 autocast needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        # Its own scaler: the discriminator's loss and gradients have another scale than the head's.
        self.discriminator_scaler = torch.amp.GradScaler(self.device.type,
                                                         enabled=self.autocast_dtype == torch.float16)
        self.discriminator: nn.Module | None = None
        self.discriminator_optimizer = None
        if config.adv_weight > 0:
            disc_config = DiscriminatorConfig(
                num_layers=config.discriminator_layers or min(3, self.head_module.config.num_layers),
                hidden_size=config.discriminator_hidden_size,
            )
            self.discriminator = Discriminator(disc_config, output_rows=self.target_rows.float()).to(self.device)
            # beta1 = 0.5: the usual GAN setting (momentum from a moving opponent's gradients misleads).
            self.discriminator_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=config.discriminator_lr, betas=(0.5, 0.999)
            )
        self.best_val_tau: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.val_rank_accuracy: list[list[float]] = []  # [step][rank], from the last validation
        self.best_rank_accuracy: list[list[float]] = []
        self.best_validation: dict[str, float] = {}  # the best epoch's val_* metrics
        self._last_predictions: Predictions | None = None

    def progress(self, step: int) -> float | None:
        """How far training is, in [0, 1]: by steps of the planned total or by time of `max_train_seconds`,
        whichever is further (so a time-budgeted run still completes its schedule); None when neither is known."""
        fractions = []
        if self.total_steps:
            fractions.append((step + 1) / self.total_steps)
        if self.config.max_train_seconds:
            fractions.append(self.train_seconds / self.config.max_train_seconds)
        return min(1.0, max(fractions)) if fractions else None

    @property
    def discriminator_module(self) -> Discriminator | None:
        return getattr(self.discriminator, "module", self.discriminator)

    def wrap_discriminator(self, wrap) -> None:
        """Lets the Ray layer wrap the discriminator for DDP without this module knowing about Ray."""
        if self.discriminator is not None:
            self.discriminator = wrap(self.discriminator)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    @property
    def feature_dtype(self) -> torch.dtype:
        return self.autocast_dtype or torch.float32

    def _last_hidden(self, features: torch.Tensor) -> torch.Tensor:
        """The target's last hidden state `(..., H)` out of a batch's features (which may carry fused layers)."""
        return features[..., : self.target_rows.shape[-1]]

    def _target_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_shape(F.linear(features, self.target_rows.to(features.dtype)))

    # --- predictions -------------------------------------------------------------------------------------------

    def predict(self, batch: TrainBatch, *, head: nn.Module | None = None) -> Predictions:
        head = head if head is not None else self.head
        if isinstance(self.head_module, MedusaHeads):
            return self._predict_medusa(batch, head)
        return self._predict_eagle(batch, head)

    def _predict_medusa(self, batch: TrainBatch, head: nn.Module) -> Predictions:
        features, mask = batch.features, batch.loss_mask
        num_heads = self.head_module.config.num_heads
        # valid[i][b, t]: head i at position t predicts token t+2+i, which is a response token.
        valid = [F.pad(mask[:, 2 + i :], (0, 2 + i), value=False) for i in range(num_heads)]
        any_valid = torch.stack(valid).any(0)  # (B, T)
        all_logits = head(features[any_valid])  # (num_heads, N_any, V)
        draft, target, context, weights = [], [], [], []
        for i in range(num_heads):
            keep = valid[i][any_valid]
            draft.append(all_logits[i][keep])
            target.append(self._target_logits(_shift_left(features, 1 + i)[valid[i]]))
            context.append(features[valid[i]])
            weights.append(torch.full((int(keep.sum()),), self.config.depth_loss_decay ** i, device=features.device))
        return Predictions(torch.cat(draft), torch.cat(target).detach(), torch.cat(context), torch.cat(weights))

    def _noise(self, features: torch.Tensor) -> torch.Tensor:
        amplitude = self.config.feature_noise
        return features + (torch.rand_like(features) * 2 - 1) * amplitude

    def _predict_eagle(self, batch: TrainBatch, head: nn.Module, *, depth: int | None = None) -> Predictions:
        features, ids, mask = batch.features, batch.input_ids, batch.loss_mask
        depth = depth or self.config.unroll_depth
        noise = self._noise if head.training and self.config.feature_noise > 0 else None
        steps = head(features[:, :-1], ids[:, 1:], unroll_depth=depth, noise=noise)  # depth x (B, L, H)
        last_hidden = self._last_hidden(features)
        next_features = last_hidden[:, 1:]  # (B, L, H): f_{p+1}, what step d at position p should predict
        first_valid = F.pad(mask[:, 2:], (0, 1), value=False)  # (B, L): token p+2 is a response token
        target_all = self._target_logits(next_features[first_valid]).detach()
        draft, target, context, weights, predicted, true = [], [], [], [], [], []
        for step, step_features in enumerate(steps):
            # The chain of this row starts at p - step; it is drafted only if its first token is a response token.
            valid = first_valid & _shift_right(first_valid, step)
            chosen = step_features[valid]
            draft.append(self.head_module.logits(chosen))
            target.append(target_all[valid[first_valid]])
            context.append(last_hidden[:, :-1][valid])
            predicted.append(chosen)
            true.append(next_features[valid])
            weights.append(torch.full((chosen.shape[0],), self.config.depth_loss_decay ** step, device=chosen.device))
        return Predictions(
            draft_logits=torch.cat(draft), target_logits=torch.cat(target), context=torch.cat(context),
            weights=torch.cat(weights), predicted_features=torch.cat(predicted), true_features=torch.cat(true),
        )

    # --- steps -------------------------------------------------------------------------------------------------

    def adv_weight_now(self) -> float:
        """lambda, ramped up linearly over adv_warmup_steps (the discriminator first learns what to tell apart)."""
        warmup = self.config.adv_warmup_steps
        return self.config.adv_weight * (min(1.0, (self.step + 1) / warmup) if warmup else 1.0)

    def _losses(self, predictions: Predictions) -> dict[str, torch.Tensor]:
        target_probs = torch.softmax(predictions.target_logits.float(), dim=-1)
        terms = {"loss_distill": losses.distill_loss(predictions.draft_logits, target_probs, predictions.weights)}
        if predictions.predicted_features is not None:
            terms["loss_feature"] = losses.feature_loss(
                predictions.predicted_features, predictions.true_features, predictions.weights)
        return terms

    def generator_step(self, batch: TrainBatch) -> dict[str, float]:
        self.head.train()
        with self.autocast():
            predictions = self.predict(batch)
            terms = self._losses(predictions)
            loss = terms["loss_distill"] + self.config.feature_loss_weight * terms.get("loss_feature", 0.0)
            if self.discriminator is not None:
                draft_scores = self.discriminator(predictions.context, predictions.draft_logits)
                terms["loss_adv_g"] = losses.adversarial_generator_loss(draft_scores, predictions.weights)
                loss = losses.generator_loss(loss, terms["loss_adv_g"], adv_weight=self.adv_weight_now())
        self.head_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.head_optimizer)
        metrics = {"loss_g": loss.item(), **{name: value.item() for name, value in terms.items()}}
        if self.config.grad_clip:
            metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip))
        self.scaler.step(self.head_optimizer)
        self.scaler.update()
        metrics["lr"] = self.head_scheduler.get_last_lr()[0]
        self._last_predictions = Predictions(
            draft_logits=predictions.draft_logits.detach(), target_logits=predictions.target_logits,
            context=predictions.context.detach(), weights=predictions.weights,
        )
        return metrics

    def discriminator_step(self, batch: TrainBatch) -> dict[str, float]:
        """One discriminator update on the last generator step's drafts (detached) and the target's labels."""
        if self.discriminator is None:
            return {}
        predictions = self._last_predictions
        if predictions is None:
            with torch.no_grad(), self.autocast():
                predictions = self.predict(batch)
        with self.autocast():
            draft_scores = self.discriminator(predictions.context, predictions.draft_logits.detach())
            target_scores = self.discriminator(predictions.context, predictions.target_logits)
            loss_adv_d = losses.discriminator_loss(draft_scores, target_scores, predictions.weights,
                                                   label_smoothing=self.config.adv_label_smoothing)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        self.discriminator_scaler.scale(loss_adv_d).backward()
        self.discriminator_scaler.step(self.discriminator_optimizer)
        self.discriminator_scaler.update()
        accuracy = losses.discriminator_accuracy(draft_scores.detach(), target_scores.detach(), predictions.weights)
        return {"loss_adv_d": loss_adv_d.item(), "d_accuracy": accuracy.item(), "adv_weight": self.adv_weight_now()}

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for _ in range(self.config.g_steps):
            metrics.update(self.generator_step(batch))
        for _ in range(self.config.d_steps if self.discriminator is not None else 0):
            metrics.update(self.discriminator_step(batch))
        self._last_predictions = None
        # Once per training step, not per generator step: the schedule's length counts training steps, so with
        # g_steps > 1 stepping per update would finish warm-up and decay early and train the rest at the floor.
        self.head_scheduler.step()
        self.step += 1
        return metrics

    # --- validation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[TrainBatch]) -> dict[str, float | None]:
        """Validation through the unwrapped head (never a DDP wrapper: it runs on one rank only).

        `val_tau`: the acceptance length greedy chain drafting of `val_draft_length` tokens reaches when decoding
        is replayed on the held-out answers: round by round from each answer's first token (every assistant turn
        of a multi-turn row on its own), each round accepting the leading drafted tokens equal to the target's own
        greedy tokens, then one token of the target's; tokens per target pass, the prefill counted, as decoding's
        tau. (Averaging over every position as a chain start
        instead overstates it: decoding spends more rounds where drafts fail. On 24 held-out self-instruct answers
        that average said 3.05, real decoding 2.77 and this replay 2.72.) `val_acc_n`: the n-th drafted token's
        accuracy given the first n-1 were right, over every position (an estimate of n-alpha). Also the
        distillation loss and the discriminator's accuracy."""
        self.head_module.eval()
        if self.discriminator is not None:  # no spectral-norm power iterations on held-out data (rank 0 only)
            self.discriminator_module.eval()
        depth = self.config.val_draft_length
        reached = torch.zeros(depth)
        correct = torch.zeros(depth)
        tree_reached = torch.zeros(depth)
        tree_ranks = torch.zeros(depth, TREE_RANKS)
        tokens = passes = 0
        loss_total = loss_weight = d_correct = d_total = 0.0
        for batch in batches:
            with self.autocast():
                ranks, evaluable = self.chain_ranks(batch, depth)  # (D, B, T) each, indexed by chain start
                predictions = self.predict(batch, head=self.head_module)
            hits = ranks == 0
            self._count_tree_ranks(ranks, evaluable, tree_reached, tree_ranks)
            alive = evaluable[0].clone()
            leading = torch.zeros(alive.shape, dtype=torch.long, device=alive.device)  # accepted drafts per start
            for step in range(hits.shape[0]):
                alive &= evaluable[step]
                reached[step] += alive.sum().item()
                alive &= hits[step]
                correct[step] += alive.sum().item()
                leading += alive
            for row_leading, row_mask in zip(leading.tolist(), batch.loss_mask.tolist()):
                row_tokens, row_passes = replay_chain_decoding(row_leading, row_mask)
                tokens, passes = tokens + row_tokens, passes + row_passes
            count = float(predictions.weights.sum())
            if count:
                loss_total += float(self._losses(predictions)["loss_distill"]) * count
                loss_weight += count
                if self.discriminator is not None:
                    disc = self.discriminator_module
                    draft_scores = disc(predictions.context, predictions.draft_logits)
                    target_scores = disc(predictions.context, predictions.target_logits)
                    d_correct += float(losses.discriminator_accuracy(draft_scores, target_scores, predictions.weights)) * count
                    d_total += count
        self.head_module.train()
        if self.discriminator is not None:
            self.discriminator_module.train()
        metrics: dict[str, float | None] = {
            f"val_acc_{step + 1}": float(correct[step] / reached[step]) if reached[step] else None
            for step in range(depth)
        }
        metrics["val_tau"] = tokens / passes if passes else None
        self.val_rank_accuracy = [(tree_ranks[d] / tree_reached[d]).tolist() for d in range(depth) if tree_reached[d]]
        metrics["val_loss_distill"] = loss_total / loss_weight if loss_weight else None
        metrics["val_d_accuracy"] = d_correct / d_total if d_total else None
        return metrics

    @staticmethod
    def _count_tree_ranks(ranks: torch.Tensor, evaluable: torch.Tensor, reached: torch.Tensor,
                          counts: torch.Tensor) -> None:
        """Per step d and rank r: how often the target's token is the head's rank-r draft, among starts whose
        earlier target tokens were all within the top TREE_RANKS (a tree could have followed them)."""
        alive = evaluable[0].clone()
        for step in range(ranks.shape[0]):
            alive &= evaluable[step]
            reached[step] += alive.sum().item()
            for rank in range(counts.shape[1]):
                counts[step, rank] += (alive & (ranks[step] == rank)).sum().item()
            alive &= ranks[step] < counts.shape[1]

    def static_tree(self, budget: int = STATIC_TREE_NODES) -> tuple[tuple[int, ...], ...]:
        """The static draft tree of `budget` nodes for the measured rank accuracies (Medusa's construction);
        empty before any validation."""
        accuracy = self.best_rank_accuracy or self.val_rank_accuracy
        return build_static_tree(accuracy, budget) if accuracy else ()

    def target_greedy(self, features: torch.Tensor) -> torch.Tensor:
        """The target's own greedy token after each position, full vocabulary: features `(B, T, H)` -> `(B, T)`."""
        features = self._last_hidden(features)
        flat = features.reshape(-1, features.shape[-1])
        weight = self.full_output_weight
        # The bias moves the argmax (scale and cap do not, but are cheap next to the product).
        choices = [self.full_logit_shape(F.linear(chunk.to(weight.dtype), weight)).argmax(-1)
                   for chunk in flat.split(GREEDY_CHUNK)]
        return torch.cat(choices).view(features.shape[:-1])

    def chain_hits(self, batch: TrainBatch, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For every chain start s (verified context ends at position s) and draft step d: whether the head's
        greedy draft of token s+2+d equals the target's greedy token, and whether that token is evaluable (a
        response token). Both `(depth, B, T)` bool; drafts read the head's own earlier drafts, as decoding does."""
        ranks, evaluable = self.chain_ranks(batch, depth)
        return ranks == 0, evaluable

    def chain_ranks(self, batch: TrainBatch, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `chain_hits`, but the rank of the target's greedy token among the head's drafts at each start and
        step `(depth, B, T)` long (0 = the head's first choice; the draft vocabulary's size when the token is not
        in it), and which are evaluable `(depth, B, T)` bool."""
        features, ids, mask = batch.features, batch.input_ids, batch.loss_mask
        greedy = batch.target_greedy if batch.target_greedy is not None else self.target_greedy(features)
        greedy = self._draft_index(greedy)  # (B, T): the target's token t+1, draft index
        ranks, evaluable = [], []
        if isinstance(self.head_module, MedusaHeads):
            logits = self.head_module(features)  # (num_heads, B, T, V)
            for step in range(min(depth, logits.shape[0])):
                ranks.append(_rank_of(logits[step], _shift_left(greedy, 1 + step)))
                evaluable.append(_shift_left(mask, 2 + step))
        else:
            steps = self.head_module.forward_unrolled(features[:, :-1], ids[:, 1:], depth=depth)
            for step, step_features in enumerate(steps):
                rank = _rank_of(self.head_module.logits(step_features), greedy[:, 1:])  # by position p, (B, L)
                rank = F.pad(rank, (0, 1), value=int(self.target_rows.shape[0]))
                ranks.append(_shift_left(rank, step))  # by chain start s = p - step
                evaluable.append(_shift_left(mask, 2 + step))
        return torch.stack(ranks), torch.stack(evaluable)

    def _draft_index(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids -> draft-vocabulary indices; -1 for tokens outside the draft vocabulary."""
        draft_ids = self.head_module.vocabulary.draft_token_ids
        if draft_ids is None:
            return target_ids
        lookup = torch.full((self.full_output_weight.shape[0],), -1, dtype=torch.long, device=target_ids.device)
        lookup[draft_ids.to(target_ids.device)] = torch.arange(len(draft_ids), device=target_ids.device)
        return lookup[target_ids]

    # --- best epoch --------------------------------------------------------------------------------------------

    def consider_best(self, val_tau: float | None, epoch: int, validation: dict[str, float] | None = None) -> bool:
        """Keeps a copy of the head (and its `validation` metrics) if this epoch's validation tau is the best so
        far; True if it is."""
        if val_tau is None or (self.best_val_tau is not None and val_tau <= self.best_val_tau):
            return False
        self.best_val_tau, self.best_epoch = val_tau, epoch
        self.best_validation = dict(validation or {"val_tau": val_tau})
        self.best_state = {k: v.detach().clone().cpu() for k, v in self.head_module.state_dict().items()}
        self.best_rank_accuracy = self.val_rank_accuracy
        return True

    def export_state(self) -> dict[str, torch.Tensor]:
        """The head weights to export: the best validated epoch's when `select_best`, else the current ones."""
        if self.config.select_best and self.best_state is not None:
            return self.best_state
        return {k: v.detach().cpu() for k, v in self.head_module.state_dict().items()}

    # --- checkpoint state as flat tensors + JSON (safetensors: nothing is unpickled on resume) ---

    def save_state(self, directory: Path) -> None:
        tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in self.head_module.state_dict().items()}
        tensors.update(_optimizer_tensors("head_optimizer", self.head_optimizer))
        if self.best_state is not None:
            tensors.update({f"best.{k}": v.contiguous() for k, v in self.best_state.items()})
        if self.discriminator is not None:
            tensors.update({f"disc.{k}": v.detach().contiguous().cpu()
                            for k, v in self.discriminator_module.state_dict().items()})
            tensors.update(_optimizer_tensors("disc_optimizer", self.discriminator_optimizer))
        tensors.update(self._rng_state())
        save_file(tensors, directory / "trainer_state.safetensors")
        scheduler = {k: v for k, v in self.head_scheduler.state_dict().items() if k != "lr_lambdas"}
        (directory / "trainer_state.json").write_text(json.dumps({
            "step": self.step, "train_seconds": self.train_seconds, "best_val_tau": self.best_val_tau,
            "best_epoch": self.best_epoch, "scheduler": scheduler, "scaler": self.scaler.state_dict(),
            "discriminator_scaler": self.discriminator_scaler.state_dict(),
            "best_rank_accuracy": self.best_rank_accuracy, "val_rank_accuracy": self.val_rank_accuracy,
            "best_validation": self.best_validation,
        }))

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """The random state the training steps draw from (feature noise): the CPU's, and the device's on CUDA."""
        state = {"rng.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state(self, directory: Path) -> None:
        tensors = load_file(directory / "trainer_state.safetensors")
        # A resumed run draws the random numbers the uninterrupted one would have (absent in older checkpoints).
        if "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.head_module.load_state_dict(_with_prefix(tensors, "head."))
        _load_optimizer(self.head_optimizer, tensors, "head_optimizer")
        best = _with_prefix(tensors, "best.")
        self.best_state = best or None
        if self.discriminator is not None:
            self.discriminator_module.load_state_dict(_with_prefix(tensors, "disc."))
            _load_optimizer(self.discriminator_optimizer, tensors, "disc_optimizer")
        state = json.loads((directory / "trainer_state.json").read_text())
        self.step, self.train_seconds = state["step"], state.get("train_seconds", 0.0)
        self.best_val_tau, self.best_epoch = state.get("best_val_tau"), state.get("best_epoch")
        self.best_rank_accuracy = state.get("best_rank_accuracy", [])
        # A checkpoint from before best_validation was kept still knows the best epoch's tau.
        self.best_validation = state.get("best_validation") or (
            {"val_tau": self.best_val_tau} if self.best_val_tau is not None else {})
        self.val_rank_accuracy = state.get("val_rank_accuracy", [])
        self.head_scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
        # The optimizer's param groups are the fresh ones, at the schedule's first value; the scheduler's state
        # holds the rate the next step should use, so the first step after a resume runs at it.
        for group, lr in zip(self.head_optimizer.param_groups, self.head_scheduler.get_last_lr()):
            group["lr"] = lr
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("discriminator_scaler"):
            self.discriminator_scaler.load_state_dict(state["discriminator_scaler"])


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


def replay_chain_decoding(leading: list[int], loss_mask: list[int]) -> tuple[int, int]:
    """Greedy chain decoding replayed on one row's answers: `leading[s]` is how many drafted tokens a round whose
    verified context ends at position s accepts; `loss_mask` marks the answers. Returns (answer tokens, target
    passes). Each answer (a run of marked positions: a multi-turn row has one per assistant turn) is decoded on
    its own, its prefill's pass (which emits its first token) counted; the turns between are prompt, not decoded."""
    tokens = passes = 0
    for first, last in _answer_spans(loss_mask):
        pending = first  # the newest emitted token, not yet in the target's cache
        tokens, passes = tokens + 1, passes + 1
        while pending < last:
            emitted = min(leading[pending - 1] + 1, last - pending)  # accepted drafts, then the target's own token
            tokens, passes, pending = tokens + emitted, passes + 1, pending + emitted
    return tokens, passes


def _answer_spans(loss_mask: list[int]) -> list[tuple[int, int]]:
    """(first, last) positions of each run of marked positions."""
    spans: list[tuple[int, int]] = []
    for position, in_answer in enumerate(loss_mask):
        if not in_answer:
            continue
        if spans and spans[-1][1] == position - 1:
            spans[-1] = (spans[-1][0], position)
        else:
            spans.append((position, position))
    return spans


def iterate_batches(
    rows: Sequence[dict[str, Any]], *, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
    lengths: Sequence[int] | None = None,
) -> Iterator[list[int]]:
    """Row indices per batch; the order is a function of (seed, epoch) so a resumed run sees the same batches.

    With `lengths`, rows of similar length are batched together (within windows of 64 batches, then the batches
    are shuffled): less padding, same randomness of what a batch holds across epochs."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(rows), generator=generator).tolist()
    else:
        order = list(range(len(rows)))
    batches = []
    window = batch_size * 64 if lengths is not None else len(order) or 1
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        if lengths is not None:
            chunk = sorted(chunk, key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle and lengths is not None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    yield from batches


# ----------------------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class LoopHooks:
    """What the caller does around the shared loop: log metrics, write checkpoints, inject faults (tests)."""

    log: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    checkpoint: Callable[[dict[str, float]], None] = lambda metrics: None
    after_step: Callable[[int], None] = lambda step: None
    progress: bool = False


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return max(1, -(-num_rows // batch_size))


def planned_steps(config: TrainConfig, num_rows: int) -> int:
    return config.max_steps or steps_per_epoch(num_rows, config.batch_size) * config.epochs


def run_training_loop(
    trainer: KoalaTrainer, *, train_rows: Sequence[dict[str, Any]], features, validate: Callable[[], dict[str, float]],
    hooks: LoopHooks,
) -> dict[str, float]:
    """Trains from `trainer.step` (0, or where a checkpoint left off) to the planned number of steps, validating at
    every epoch end (and tracking the best epoch), logging every `log_every_steps` (0: about LOSS_CURVE_POINTS times per run) and checkpointing every
    `checkpoint_every_steps` and at each epoch end. `max_train_seconds` ends training early. Returns the last
    metrics."""
    config = trainer.config
    per_epoch = steps_per_epoch(len(train_rows), config.batch_size)
    total_steps = planned_steps(config, len(train_rows))
    epochs = -(-total_steps // per_epoch)
    lengths = [row_length(r, config.max_seq_len) for r in train_rows]
    log_every = config.log_every_steps or max(1, total_steps // LOSS_CURVE_POINTS)
    out_of_time = bool(config.max_train_seconds) and trainer.train_seconds >= config.max_train_seconds
    if trainer.step >= total_steps or out_of_time:  # a finished run resumed: nothing to train, report where it ended
        return exported_metrics(trainer, {**{k: v for k, v in validate().items() if v is not None},
                                          "step": trainer.step, "train_seconds": trainer.train_seconds})
    metrics: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=trainer.step, desc="train", unit="step", disable=not hooks.progress,
               mininterval=10)
    for epoch in range(trainer.step // per_epoch, epochs):
        batches = list(iterate_batches(train_rows, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                                       lengths=lengths))
        for batch_index in range(trainer.step - epoch * per_epoch, len(batches)):
            started = time.perf_counter()
            metrics = trainer.train_step(features.batch(train_rows, batches[batch_index], dtype=trainer.feature_dtype))
            trainer.train_seconds += time.perf_counter() - started
            bar.update(1)
            out_of_time = bool(config.max_train_seconds) and trainer.train_seconds >= config.max_train_seconds
            last = trainer.step >= total_steps or out_of_time
            epoch_done = last or batch_index == len(batches) - 1
            metrics.update(epoch=epoch, step=trainer.step, train_seconds=trainer.train_seconds)
            if epoch_done:
                validation = {k: v for k, v in validate().items() if v is not None}
                metrics.update(validation)
                metrics["best"] = float(trainer.consider_best(metrics.get("val_tau"), epoch, validation))
                if hooks.progress:
                    bar.write(_epoch_line(metrics))
            if epoch_done or trainer.step % log_every == 0:
                hooks.log(metrics, trainer.step)
            if last:  # the last report describes the head that is exported (the logged curve keeps the last epoch)
                metrics = exported_metrics(trainer, metrics)
            if epoch_done or trainer.step % config.checkpoint_every_steps == 0:
                hooks.checkpoint(metrics)
            hooks.after_step(trainer.step)
            if last:
                bar.close()
                return metrics
    bar.close()
    return metrics


def exported_metrics(trainer: KoalaTrainer, metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` with the validation figures of the head that is exported: the best epoch's when `select_best`
    picked one (the last epoch's own go to `last_val_*`), plus `best_epoch`."""
    if not (trainer.config.select_best and trainer.best_validation):
        return metrics
    last = {f"last_{k}": v for k, v in metrics.items() if k.startswith("val_")}
    kept = {k: v for k, v in metrics.items() if not k.startswith("val_")}
    return {**kept, **last, **trainer.best_validation, "best_epoch": float(trainer.best_epoch)}


def _epoch_line(metrics: dict[str, float]) -> str:
    accuracies = " ".join(f"{metrics[k]:.3f}" for k in sorted(metrics) if k.startswith("val_acc_"))
    tau = metrics.get("val_tau")
    parts = [f"epoch {int(metrics['epoch'])} step {int(metrics['step'])}",
             f"loss {metrics.get('loss_distill', float('nan')):.3f}",
             f"val_tau {tau:.3f}" if tau is not None else "val_tau -", f"val_acc [{accuracies}]",
             f"{metrics['train_seconds']:.0f}s"]
    if "val_d_accuracy" in metrics:
        parts.append(f"D acc {metrics['val_d_accuracy']:.3f}")
    return "[train] " + "  ".join(parts) + ("  (best)" if metrics.get("best") else "")
