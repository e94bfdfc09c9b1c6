"""KOALA draft heads: Medusa heads with K residual blocks and an EAGLE head with K decoder layers.

Both read the target's last hidden state ("feature", post final norm, as `output_hidden_states` returns it); an
EAGLE head may also read intermediate layers (`extra_feature_layers`, EAGLE-3's fusion, see `head_input_features`).
A head may predict over a subset of the target vocabulary (`draft_vocab_size`, FR-Spec style); `draft_token_ids`
maps its output index to the target token id.

Drafting is exposed as `new_state()` + `propose(...)`: every generation owns its state (EAGLE's KV cache), so
concurrent generations never share one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from pipeline.caches import new_cache, rollback_cache
from pipeline.cpu_linear import (
    OneDnnLinear, linear, onednn_bf16_available, packs_weights, use_onednn_linears, uses_onednn_linears,
)
from pipeline.config import ConfigError, HeadConfig, check_dtype
from pipeline.trees import RankPath, TreeShape, best_nodes, build_static_tree, static_tree_parents

log = logging.getLogger(__name__)

# Drafters shipped in the repository (pipeline/drafters/<name>, each with a model card), per target alias.
DRAFTERS_DIR = Path(__file__).resolve().parent / "drafters"
DEFAULT_DRAFTERS = {"smollm2": "smollm2-eagle"}

HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "head.safetensors"
FORMAT_VERSION = 1

# pick(draft_logits (V_draft,)) -> (draft vocabulary index, draft probabilities (V_draft,) or None when greedy)
Picker = Callable[[torch.Tensor], tuple[int, torch.Tensor | None]]
# draw(draft_logits (V_draft,), count) -> up to `count` (draft vocabulary index, the distribution (V_draft,) it was
# drawn from) pairs, drawn one after another without replacement (decoding's `_Picker.draw`)
Drawer = Callable[[torch.Tensor, int], list[tuple[int, torch.Tensor]]]


class HeadLoadError(RuntimeError):
    """A head directory is missing, malformed, or was trained for a different target."""


@dataclasses.dataclass
class Proposal:
    """Draft tokens (target ids) and, when sampling, each one's draft distribution over the draft vocabulary.

    `parents` makes it a tree (pipeline/trees.py): node i's parent index, -1 for a child of the pending token,
    parents before children; None is a chain. A tree node's distribution is the one it was drawn from (its
    siblings drawn before it removed); None marks a deterministic draft (a top-k token, a prompt-lookup token).
    `paths` are a tree's nodes' rank paths (None for a node outside the drafter's tree, e.g. prompt lookup's): the
    decoder's `auto` budget learns from them which of a static tree's paths are accepted. A drafter that leaves them
    None drafts its trees at the ceiling size and nothing is learnt."""

    token_ids: list[int]
    draft_probs: list[torch.Tensor | None]
    parents: list[int] | None = None
    paths: list[RankPath | None] | None = None


class DraftHead(Protocol):
    config: HeadConfig
    vocabulary: _DraftVocabulary

    @property
    def max_draft_length(self) -> int: ...

    def new_state(self) -> Any: ...

    def propose(
        self, state: Any, features: torch.Tensor, next_token_ids: torch.Tensor, num_tokens: int, pick: Picker,
        *, min_chain_prob: float = 0.0,
    ) -> Proposal: ...

    def propose_tree(
        self, state: Any, features: torch.Tensor, next_token_ids: torch.Tensor, shape: TreeShape, max_depth: int,
        draw: Drawer | None = None,
    ) -> Proposal: ...


class _ChainConfidence:
    """Ends a draft chain after the first token at which the product of the chain's draft probabilities falls
    below `threshold`: that product tracks the chance that the target accepts every token so far (draft
    confidence follows acceptance, EAGLE-2), so drafting further would cost more than it is expected to save.

    The decision to draft token i depends only on tokens before i, never on token i itself: with sampling, dropping
    a drafted token because of its own value would bias the output; this way the output at every position is the
    target's distribution whether it was drafted or not, so early stopping stays lossless."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.probability = 1.0

    def continues(self, logits: torch.Tensor, index: int, probs: torch.Tensor | None) -> bool:
        """Called with each drafted token (draft logits `(V_draft,)`, its index, its sampling distribution)."""
        if not self.threshold:
            return True
        chosen = probs[index] if probs is not None else torch.softmax(logits.float(), dim=-1)[index]
        self.probability *= float(chosen)
        return self.probability >= self.threshold


def head_input_features(hidden_states: Sequence[torch.Tensor], extra_layers: Sequence[int] = ()) -> torch.Tensor:
    """What a head reads from the target's `output_hidden_states`: the last hidden state `(B, T, H)`, then (EAGLE-3
    style fusion) each of `extra_layers`' outputs, RMS-normalised, concatenated `(B, T, (1 + n) H)`. Intermediate
    residual streams run orders of magnitude larger than the normed last state (and past fp16's range in some
    models): normalising gives the fusion inputs of one scale and keeps the fp16 feature cache finite."""
    last = hidden_states[-1]
    if not extra_layers:
        return last
    extras = [F.rms_norm(hidden_states[layer].float(), (last.shape[-1],), eps=1e-6).to(last.dtype)
              for layer in extra_layers]
    return torch.cat([last, *extras], dim=-1)


def _frozen_lm_head_rows(target: PreTrainedModel, draft_token_ids: torch.Tensor | None) -> torch.Tensor:
    """The target LM head weight `(V_draft, H)`: all rows, or the draft vocabulary's rows."""
    weight = target.get_output_embeddings().weight.detach()
    if draft_token_ids is None:
        return weight
    return weight[draft_token_ids.to(weight.device)].clone()


class _DraftVocabulary(nn.Module):
    """Maps draft-vocabulary indices to target token ids (identity for the full vocabulary)."""

    def __init__(self, draft_token_ids: torch.Tensor | None) -> None:
        super().__init__()
        if draft_token_ids is not None:
            self.register_buffer("draft_token_ids", draft_token_ids.to(torch.long).clone())
        else:
            self.draft_token_ids = None

    def to_target_id(self, index: int) -> int:
        return index if self.draft_token_ids is None else int(self.draft_token_ids[index])

    def to_target_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Draft indices (any shape) -> target ids, on their device: many at once cost one transfer to the host
        where `to_target_id` costs one each (a device sync per token on a GPU)."""
        return indices if self.draft_token_ids is None else self.draft_token_ids[indices]

    def coverage(self, token_ids: Sequence[int]) -> float | None:
        """The share of `token_ids` (target ids) the draft vocabulary holds, None for the full vocabulary: a token
        outside it is one no draft can propose, so a low share on a domain says the map came from other text."""
        if self.draft_token_ids is None or not token_ids:
            return None
        ids = torch.as_tensor(list(token_ids), device=self.draft_token_ids.device)
        return float(torch.isin(ids, self.draft_token_ids).float().mean())


class ResBlock(nn.Module):
    """`x + SiLU(W x + b)`, zero-initialised so a fresh block is exactly the identity (as Medusa intends)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


def _static_tree(config: HeadConfig) -> tuple[tuple[int, ...], ...] | None:
    return tuple(map(tuple, config.static_tree)) or None


class MedusaHeads(nn.Module):
    """`num_heads` Medusa heads; head i predicts the token i+1 steps after the target's next token.

    Each head is K residual blocks and a linear map to the draft vocabulary initialised from the target's LM head.
    """

    def __init__(self, config: HeadConfig, *, target: PreTrainedModel, draft_token_ids: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        hidden_size = target.config.hidden_size
        lm_head_rows = _frozen_lm_head_rows(target, draft_token_ids)
        self.vocabulary = _DraftVocabulary(draft_token_ids)
        self.heads = nn.ModuleList(
            self._make_head(hidden_size, lm_head_rows, config.num_layers) for _ in range(config.num_heads)
        )
        self.logit_shape = LogitShape.of(target, draft_token_ids)
        # fp32 master weights whatever the target's dtype: `load_head` casts for inference, training keeps fp32
        # (AdamW steps on bf16 weights are lost to rounding).
        self.to(device=lm_head_rows.device, dtype=torch.float32)

    @staticmethod
    def _make_head(hidden_size: int, lm_head_rows: torch.Tensor, num_layers: int) -> nn.Sequential:
        projection = nn.Linear(hidden_size, lm_head_rows.shape[0], bias=False)
        with torch.no_grad():
            projection.weight.copy_(lm_head_rows)
        return nn.Sequential(*(ResBlock(hidden_size) for _ in range(num_layers)), projection)

    @property
    def max_draft_length(self) -> int:
        return self.config.num_heads

    @property
    def static_tree(self) -> tuple[tuple[int, ...], ...] | None:
        return _static_tree(self.config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features `(B, T, H)` -> draft logits `(num_heads, B, T, V_draft)`."""
        return torch.stack([self._head_logits(head, features) for head in self.heads])

    def _head_logits(self, head: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return self.logit_shape(head(features))

    def new_state(self) -> None:
        return None

    def propose(
        self, state: None, features: torch.Tensor, next_token_ids: torch.Tensor, num_tokens: int, pick: Picker,
        *, min_chain_prob: float = 0.0,
    ) -> Proposal:
        """Drafts from the feature of the last verified position `features[:, -1]`; `next_token_ids` is unused
        because Medusa heads see only the feature. `min_chain_prob` ends the chain early (`_ChainConfidence`)."""
        proposal = Proposal(token_ids=[], draft_probs=[])
        last_feature = features[:, -1].to(self.heads[0][-1].weight.dtype)  # (1, H)
        confidence = _ChainConfidence(min_chain_prob)
        for head in self.heads[:num_tokens]:
            logits = self._head_logits(head, last_feature)[0]
            index, probs = pick(logits)
            proposal.token_ids.append(self.vocabulary.to_target_id(index))
            proposal.draft_probs.append(probs)
            if not confidence.continues(logits, index, probs):
                break
        return proposal

    def propose_tree(
        self, state: None, features: torch.Tensor, next_token_ids: torch.Tensor, shape: TreeShape, max_depth: int,
        draw: Drawer | None = None,
    ) -> Proposal:
        """A tree over the heads' top-k tokens (deterministic drafts, for greedy and sampled verification alike, so
        `draw` is unused: see `decoding.accept_sampling`). Medusa heads do not read each other's tokens, so a
        rank path is the same tokens under any parent: a static shape is used as it is, a dynamic one takes the
        `nodes` paths whose product of head probabilities is highest this round."""
        last_feature = features[:, -1].to(self.heads[0][-1].weight.dtype)  # (1, H)
        depth = min(max_depth, len(self.heads), shape.depth)
        if depth <= 0:
            return Proposal(token_ids=[], draft_probs=[])
        widest = max((max(p) for p in shape.static), default=0) + 1 if shape.static else shape.top_k
        logits = torch.cat([self._head_logits(head, last_feature) for head in self.heads[:depth]])  # (depth, V)
        values, indices = torch.log_softmax(logits.float(), dim=-1).topk(widest)
        values, token_ids = values.tolist(), self.vocabulary.to_target_ids(indices).tolist()  # per depth, by rank
        if shape.static is not None:
            paths = [p for p in shape.static if len(p) <= depth]
        else:
            paths = build_static_tree([[math.exp(v) for v in row] for row in values], shape.nodes)
        ordered, parents = static_tree_parents(paths)
        tokens = [token_ids[len(p) - 1][p[-1]] for p in ordered]
        return Proposal(token_ids=tokens, draft_probs=[None] * len(tokens), parents=parents, paths=list(ordered))


@dataclasses.dataclass
class EagleState:
    """Per-generation EAGLE drafting state: its own KV cache, of which `committed` positions hold verified
    target features (the rest are speculative and are rolled back before the next round)."""

    cache: DynamicCache
    committed: int = 0
    pending_features: list[torch.Tensor] = dataclasses.field(default_factory=list)
    pending_tokens: list[torch.Tensor] = dataclasses.field(default_factory=list)


def _decoder_parts(target: PreTrainedModel) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(first decoder layer, final norm, rotary embedding) of a decoder-only target with rotary attention layers,
    or a one-line refusal naming what is missing (e.g. GPT-2's learned positions, Mamba's state-space layers)."""
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else None
    parts = {name: getattr(decoder, name, None) for name in ("layers", "norm", "rotary_emb")}
    missing = [name for name, part in parts.items() if part is None]
    if not missing and not hasattr(parts["layers"][0], "self_attn"):
        missing = ["attention decoder layers (layers[0].self_attn)"]
    if missing:
        raise ConfigError(
            f"head.head_type: an EAGLE head reuses the target's decoder layer, final norm and rotary embedding; "
            f"{type(target).__name__} has no {', '.join(missing)}. Use --type medusa for this target."
        )
    return parts["layers"][0], parts["norm"], parts["rotary_emb"]


@dataclasses.dataclass(frozen=True, eq=False)
class LogitShape:
    """What a target does to its LM head's product `h W^T` to get its logits: `cap * tanh((h W^T + bias) * scale
    / cap)`, where `bias` is the LM head's (Phi), `scale` its config's `logit_scale` (Cohere) or `1 /
    logits_scaling` (Granite), and `cap` its `final_logit_softcapping` (Gemma-2, some Gemma-3). Every head's draft
    logits and training's target logits go through the target's shape: a head without it drafts another
    distribution (another argmax with a bias, another temperature with a scale) and distills wrong targets."""

    bias: torch.Tensor | None = None  # (V,) or the draft vocabulary's (V_draft,); frozen, not a head parameter
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, target: PreTrainedModel, draft_token_ids: torch.Tensor | None = None) -> LogitShape:
        """Read once from the target's (text) config and LM head; `draft_token_ids` picks the bias's rows."""
        config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
        bias = getattr(target.get_output_embeddings(), "bias", None)
        if bias is not None:
            bias = bias.detach()
            if draft_token_ids is not None:
                bias = bias[draft_token_ids.to(bias.device)]
        scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
        return cls(bias=bias, scale=scale, softcap=getattr(config, "final_logit_softcapping", None) or None)

    def __call__(self, product: torch.Tensor) -> torch.Tensor:
        """`h W^T` `(..., V)` -> the target's logits for it `(..., V)`."""
        if self.bias is not None:
            product = product + self.bias.to(device=product.device, dtype=product.dtype)
        if self.scale != 1.0:
            product = product * self.scale
        return product if not self.softcap else torch.tanh(product / self.softcap) * self.softcap


@functools.cache
def cache_argument(function: Callable) -> str:
    """The name under which `function` takes the KV cache: `cache` from transformers 5.2x on (`past_key_values`
    is deprecated and removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def attention_mask_for(allowed: torch.Tensor, *, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "query may attend key" pattern `(B, 1, Q, K)` in the form the attention implementation takes:
    additive floats for `eager`, booleans (True = attend) for `sdpa` and the others that accept a 4D mask."""
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    if implementation.startswith("flash"):
        raise ConfigError(
            f"head: attention implementation {implementation!r} takes no 4D masks; load the target with sdpa or eager"
        )
    return allowed


def unrolled_attention_pattern(length: int, depth: int, *, device: torch.device) -> torch.Tensor:
    """Which keys a query of unroll step `depth` sees during training-time test, `(1, 1, L, (depth+1) L)` bool.

    Keys are laid out as [step 0 (L positions), step 1, ..., step depth]. A step-d query at position p drafts the
    (d+1)-th token of a chain whose verified context ends at p - d: it sees step-0 keys (built from true target
    features) at positions <= p - d, and the step-j key at position p - d + j for j = 1..d (the chain's earlier
    drafted positions, built from predicted features) -- exactly what the drafting cache holds at that point.
    """
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    blocks = [key <= query - depth]
    blocks += [key == query - depth + step for step in range(1, depth + 1)]
    return torch.cat(blocks, dim=1)[None, None]


def _full_attention_config(target_config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """The target's config for `num_layers` head layers of full attention: the head attends to the whole context
    (it is short-lived and small), so its cache is rolled back with a plain crop, whatever the target's layer types
    (sliding windows in Mistral, Qwen2, Phi-3; alternating layer types in Gemma)."""
    config = copy.deepcopy(target_config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention"] * num_layers
    for name in ("sliding_window", "use_sliding_window"):
        if getattr(config, name, None):
            setattr(config, name, None if name == "sliding_window" else False)
    return config


def _identity_fusion(hidden_size: int, extra_layers: Sequence[int], num_target_layers: int) -> nn.Linear | None:
    """The EAGLE-3 style projection of the last hidden state and `extra_layers`' states to one feature, initialised
    to pass the last state through (a fused head starts as the plain head, and `init_head` can start from one)."""
    if not extra_layers:
        return None
    if max(extra_layers) >= num_target_layers:
        raise ConfigError(f"head.extra_feature_layers: {tuple(extra_layers)} reaches past the target's "
                          f"{num_target_layers} layers (use indices 0..{num_target_layers - 1}; the last state is "
                          "always read)")
    fuse = nn.Linear((1 + len(extra_layers)) * hidden_size, hidden_size, bias=False)
    with torch.no_grad():
        fuse.weight.zero_()
        fuse.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
    return fuse


class EagleHead(nn.Module):
    """EAGLE draft head with K decoder layers of the target's own architecture.

    Input at position t: the target feature f_t concatenated with the embedding of token t+1 (frozen target
    embedding), projected `2H -> H` (with `extra_feature_layers`, f_t is first fused from the target's last and
    those layers' states: `fuse`, `(1 + n) H -> H`, starting as "read the last state"); then K decoder layers;
    then the target's frozen final norm gives the predicted feature f_{t+1}, and the target's frozen LM head
    (draft-vocabulary rows) its logits. Drafting feeds predicted features back autoregressively; `forward_unrolled` trains exactly that (training-time test).
    """

    def __init__(self, config: HeadConfig, *, target: PreTrainedModel, draft_token_ids: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        first_layer, final_norm, rotary = _decoder_parts(target)
        self.layer_config = _full_attention_config(target.config, config.num_layers)
        hidden_size = target.config.hidden_size
        self.vocabulary = _DraftVocabulary(draft_token_ids)
        self.hidden_size = hidden_size
        self.fc = nn.Linear(2 * hidden_size, hidden_size)
        layer_class = type(first_layer)
        self.layers = nn.ModuleList(layer_class(self.layer_config, layer_idx=i) for i in range(config.num_layers))
        # Made last, so a fused head draws the same initial weights as the plain head from the same seed.
        self.fuse = _identity_fusion(hidden_size, config.extra_feature_layers, target.config.num_hidden_layers)
        self._cache_argument = cache_argument(layer_class.forward)
        # Per-layer-type rotary modules (Gemma-3) take the layer type; the head's layers are full attention.
        self._rotary_layer_type = (
            {"layer_type": "full_attention"} if "layer_type" in inspect.signature(rotary.forward).parameters else {}
        )
        self.logit_shape = LogitShape.of(target, draft_token_ids)
        self._mask_cache_argument = cache_argument(create_causal_mask)
        # Frozen target parts are referenced, not registered: they are not head parameters, are not saved, and are
        # not cast with the head. The target's own rotary module keeps its fp32 inv_freq (a bf16 copy is off by
        # 0.36 rad at position 256). The (sub)vocabulary LM head is a non-persistent buffer so `.to()` moves it.
        self._target_parts = (target.get_input_embeddings(), final_norm, rotary)
        self.register_buffer("lm_head_weight", _frozen_lm_head_rows(target, draft_token_ids), persistent=False)
        # fp32 master weights whatever the target's dtype (see MedusaHeads).
        self.to(device=target.get_output_embeddings().weight.device, dtype=torch.float32)

    @property
    def max_draft_length(self) -> int:
        return 1 << 16

    @property
    def static_tree(self) -> tuple[tuple[int, ...], ...] | None:
        return _static_tree(self.config)

    def _layers(
        self, features: torch.Tensor, next_token_ids: torch.Tensor, *, cache: DynamicCache | None,
        position_ids: torch.Tensor, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The head proper on `(B, T, H)` features and `(B, T)` next tokens -> predicted features `(B, T, H)`."""
        embed_tokens, final_norm, rotary = self._target_parts
        # Target features come in the target's dtype, predicted ones in the final norm's (fp32 under a bf16 head).
        features = features.to(self.fc.weight.dtype)
        if features.shape[-1] != self.hidden_size:  # the target's fused layers (a predicted feature is H wide)
            features = self.fuse(features)
        embeddings = embed_tokens(next_token_ids).to(features.dtype)
        hidden = self.fc(torch.cat([embeddings, features], dim=-1))
        position_embeddings = rotary(hidden, position_ids=position_ids, **self._rotary_layer_type)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
                **{self._cache_argument: cache},
            )
            if isinstance(hidden, tuple):  # decoder layers of older transformers return (hidden, ...)
                hidden = hidden[0]
        return final_norm(hidden)

    def forward(
        self, features: torch.Tensor, next_token_ids: torch.Tensor, *, cache: DynamicCache | None = None,
        unroll_depth: int = 0, noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """features `(B, T, H)`, next_token_ids `(B, T)` -> predicted next features `(B, T, H)` (post-norm).

        With `cache`, the T positions continue the cached ones and are appended to it. With `unroll_depth` > 0 this
        is `forward_unrolled` (so a DDP wrapper sees training-time test as its forward).
        """
        if unroll_depth:
            return self.forward_unrolled(features, next_token_ids, depth=unroll_depth, noise=noise)
        past_length = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past_length, past_length + features.shape[1], device=features.device)[None]
        mask = create_causal_mask(
            config=self.layer_config,
            inputs_embeds=features,
            attention_mask=None,
            position_ids=position_ids,
            **{self._mask_cache_argument: cache},
        )
        return self._layers(features, next_token_ids, cache=cache, position_ids=position_ids, mask=mask)

    def forward_unrolled(
        self, features: torch.Tensor, next_token_ids: torch.Tensor, *, depth: int,
        noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Training-time test: `depth` drafting steps over a whole sequence at once.

        features `(B, L, H)` (f_0..f_{L-1}), next_token_ids `(B, L)` (x_1..x_L) -> `depth` tensors `(B, L, H)`;
        element d at position p is the feature predicted at draft step d+1 of a chain whose verified context ends
        at p - d (so it is meaningful for p >= d), reading the step-d prediction at p - 1 as its input feature
        and attending to the same keys decoding would (`unrolled_attention_pattern`). Gradients flow through
        every step, as in HASS and EAGLE-3. `noise`, when given, perturbs the true input features (EAGLE).
        """
        length = features.shape[1]
        position_ids = torch.arange(length, device=features.device)[None]
        cache = DynamicCache(config=self.layer_config)
        implementation = self.layer_config._attn_implementation or "sdpa"
        step_input = noise(features) if noise is not None else features
        predictions = []
        for step in range(depth):
            allowed = unrolled_attention_pattern(length, step, device=features.device)
            mask_dtype = torch.get_autocast_dtype(features.device.type) if torch.is_autocast_enabled(
                features.device.type) else self.fc.weight.dtype
            mask = attention_mask_for(allowed, implementation=implementation, dtype=mask_dtype)
            predicted = self._layers(step_input, next_token_ids, cache=cache, position_ids=position_ids, mask=mask)
            predictions.append(predicted)
            # The next step's input at position p is this step's prediction at p - 1 (position 0 gets a copy of
            # itself: it only feeds positions p < step, which are never scored).
            step_input = torch.cat([predicted[:, :1], predicted[:, :-1]], dim=1)
        return predictions

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features `(..., H)` -> draft logits `(..., V_draft)` (shaped like the target's, `LogitShape`)."""
        # The LM-head rows are a buffer, not an nn.Linear: they take oneDNN's kernel when the head's layers do.
        weight = self.lm_head_weight
        features = features.to(weight.dtype)
        if isinstance(self.fc, OneDnnLinear):
            product = linear(features, weight, pack=self.fc.pack_weight)
        else:
            product = F.linear(features, weight)
        return self.logit_shape(product)

    def propose_tree(
        self, state: EagleState, features: torch.Tensor, next_token_ids: torch.Tensor, shape: TreeShape,
        max_depth: int, draw: Drawer | None = None,
    ) -> Proposal:
        """Appends the verified (feature, token) pairs like `propose`, then drafts a tree at most `max_depth` deep:
        dynamic (EAGLE-2: the best `shape.nodes` of the expanded candidates) or static (EAGLE-1). A node's children
        are the head's top-k tokens, or, with `draw` and a static shape, tokens drawn from the head's sampling
        distribution without replacement (child rank r is the (r+1)-th draw), which `decoding.accept_sampling`
        verifies by recursive rejection sampling. A dynamic shape keeps top-k children: choosing which sampled
        nodes to keep by their values would bias them."""
        predicted = self._append_verified(state, features, next_token_ids, draft=max_depth > 0)
        if predicted is None:
            return Proposal(token_ids=[], draft_probs=[])
        draw = draw if shape.static is not None else None
        nodes = _expand_eagle_tree(self, state, predicted, shape, min(max_depth, shape.depth), draw)
        parents = [n.parent for n in nodes]
        if shape.static is None:
            kept = best_nodes([n.score for n in nodes], parents, shape.nodes)
        else:
            kept = sorted(range(len(nodes)), key=lambda i: (len(nodes[i].path), nodes[i].path))
        position = {old: new for new, old in enumerate(kept)}
        return Proposal(token_ids=[nodes[i].token_id for i in kept], draft_probs=[nodes[i].drawn_from for i in kept],
                        parents=[position[nodes[i].parent] if nodes[i].parent >= 0 else -1 for i in kept],
                        paths=[nodes[i].path for i in kept])

    def new_state(self) -> EagleState:
        return EagleState(cache=DynamicCache(config=self.layer_config))

    def _append_verified(
        self, state: EagleState, features: torch.Tensor, next_token_ids: torch.Tensor, *, draft: bool = True
    ) -> torch.Tensor | None:
        """Drops last round's drafts from the head's cache, appends the verified (feature, token) pairs and returns
        the predicted feature after them `(1, 1, H)`; without `draft` the pairs only wait for the next round."""
        state.pending_features.append(features)
        state.pending_tokens.append(next_token_ids)
        if not draft:
            return None
        rollback_cache(state.cache, state.committed)
        verified_features = torch.cat(state.pending_features, dim=1).to(self.fc.weight.dtype)
        verified_tokens = torch.cat(state.pending_tokens, dim=1)
        state.pending_features.clear()
        state.pending_tokens.clear()
        predicted = self(verified_features, verified_tokens, cache=state.cache)[:, -1:]  # (1, 1, H)
        state.committed += verified_tokens.shape[1]
        return predicted

    def propose(
        self, state: EagleState, features: torch.Tensor, next_token_ids: torch.Tensor, num_tokens: int, pick: Picker,
        *, min_chain_prob: float = 0.0,
    ) -> Proposal:
        """Appends the newly verified (feature, next token) pairs to the cache, then drafts up to `num_tokens`
        tokens (fewer when `min_chain_prob` ends the chain early, see `_ChainConfidence`).

        features `(1, T, H)`: target features of the positions verified since the last call; next_token_ids
        `(1, T)`: the token after each of them (the last one is the target's pending token).
        """
        proposal = Proposal(token_ids=[], draft_probs=[])
        predicted = self._append_verified(state, features, next_token_ids, draft=num_tokens > 0)
        if predicted is None:
            return proposal
        confidence = _ChainConfidence(min_chain_prob)
        for step in range(num_tokens):
            logits = self.logits(predicted)[0, -1]
            index, probs = pick(logits)
            token_id = self.vocabulary.to_target_id(index)
            proposal.token_ids.append(token_id)
            proposal.draft_probs.append(probs)
            if step + 1 == num_tokens or not confidence.continues(logits, index, probs):
                break
            predicted = self(predicted, torch.tensor([[token_id]], device=predicted.device), cache=state.cache)
        return proposal


@dataclasses.dataclass
class _TreeNode:
    token_id: int
    parent: int  # -1: a child of the pending token
    score: float  # cumulative draft log-probability
    feature_in: torch.Tensor  # (H,) the predicted feature this node's head input reads
    path: tuple[int, ...]  # ranks from the root
    cache_index: int | None = None  # where the head cached this node once it was expanded
    drawn_from: torch.Tensor | None = None  # (V_draft,) a sampled node's distribution; None for a top-k node


def _expand_eagle_tree(
    head: EagleHead, state: EagleState, predicted: torch.Tensor, shape: TreeShape, max_depth: int,
    draw: Drawer | None = None,
) -> list[_TreeNode]:
    """EAGLE drafting as a tree: each step runs the head once on the nodes chosen for expansion (a dynamic
    shape: the `top_k` best by cumulative log-probability among the newest nodes; a static one: those with
    children in it), each attending to the verified cache, its ancestors' cached entries and itself. Children are
    the top-k tokens, or with `draw` the draws without replacement (a static shape's ranks are draw numbers)."""
    static_children: dict[tuple[int, ...], list[int]] = {}
    for static_path in shape.static or ():
        static_children.setdefault(tuple(static_path[:-1]), []).append(static_path[-1])

    def child_ranks(path: tuple[int, ...]) -> list[int]:
        if shape.static is None:
            return list(range(shape.top_k))
        return sorted(static_children.get(path, ()))

    base = state.cache.get_seq_length()
    nodes: list[_TreeNode] = []

    def add_children(parents: list[int], logits: torch.Tensor, features: torch.Tensor) -> None:
        """The children of nodes `parents` (-1: the pending token) from their draft logits and output features,
        one row each. Top-k children come from one top-k over all rows and one transfer to the host (row by row,
        each node cost device syncs: most of a GPU draft step's time); drawn children are drawn row by row."""
        wanted = [child_ranks(nodes[parent].path if parent >= 0 else ()) for parent in parents]
        widest = max((max(ranks) + 1 for ranks in wanted if ranks), default=0)
        if not widest:
            return
        if draw is None:
            values, indices = torch.log_softmax(logits.float(), dim=-1).topk(widest)
            values, token_ids = values.tolist(), head.vocabulary.to_target_ids(indices).tolist()
        for row, (parent, ranks) in enumerate(zip(parents, wanted)):
            path = nodes[parent].path if parent >= 0 else ()
            score = nodes[parent].score if parent >= 0 else 0.0
            if ranks and draw is not None:
                draws = draw(logits[row], max(ranks) + 1)  # fewer when fewer tokens have mass (top-p)
                for rank in ranks:
                    if rank < len(draws):
                        index, drawn_from = draws[rank]
                        nodes.append(_TreeNode(head.vocabulary.to_target_id(index), parent, score, features[row],
                                               path + (rank,), drawn_from=drawn_from))
            elif ranks:
                for rank in ranks:
                    nodes.append(_TreeNode(token_ids[row][rank], parent, score + values[row][rank], features[row],
                                           path + (rank,)))

    add_children([-1], head.logits(predicted)[0, -1:], predicted[0, -1:])
    newest = list(range(len(nodes)))
    implementation = head.layer_config._attn_implementation or "sdpa"
    for step in range(1, max_depth):
        if shape.static is None:
            expand = sorted(newest, key=lambda i: -nodes[i].score)[: shape.top_k]
        else:
            expand = [i for i in newest if child_ranks(nodes[i].path)]
        if not expand:
            break
        cached = state.cache.get_seq_length()
        allowed = torch.zeros(1, 1, len(expand), cached + len(expand), dtype=torch.bool)
        allowed[..., :base] = True
        for row, index in enumerate(expand):
            ancestor = nodes[index].parent
            while ancestor >= 0:
                allowed[0, 0, row, nodes[ancestor].cache_index] = True
                ancestor = nodes[ancestor].parent
            allowed[0, 0, row, cached + row] = True
            nodes[index].cache_index = cached + row
        features = torch.stack([nodes[i].feature_in for i in expand])[None]  # (1, m, H)
        tokens = torch.tensor([[nodes[i].token_id for i in expand]], device=features.device)
        positions = torch.full((1, len(expand)), base + step - 1, device=features.device)
        mask = attention_mask_for(allowed.to(features.device), implementation=implementation,
                                  dtype=head.fc.weight.dtype)
        outputs = head._layers(features, tokens, cache=state.cache, position_ids=positions, mask=mask)[0]
        first_new = len(nodes)
        add_children(expand, head.logits(outputs), outputs)  # logits (m, V_draft)
        newest = list(range(first_new, len(nodes)))
    return nodes



HEAD_CLASSES: dict[str, type[nn.Module]] = {"medusa": MedusaHeads, "eagle": EagleHead}


def refuse_recurrent_state(target: PreTrainedModel) -> None:
    """A one-line refusal for targets whose cache holds a recurrent state (Mamba and other state-space layers):
    it folds every token in, so rejected draft tokens cannot be dropped and no head can draft for the target.
    Whether a layer keeps one is known only once it has run (transformers' `is_croppable`: convolution-only
    states, e.g. LFM2's, can be rolled back), so targets with such layers run one two-token probe."""
    cache = new_cache(target.config)
    if all(getattr(layer, "is_croppable", True) for layer in cache.layers):
        return
    probe = torch.ones((1, 2), dtype=torch.long, device=target.get_output_embeddings().weight.device)
    with torch.no_grad():
        target(input_ids=probe, use_cache=True, **{cache_argument(type(target).forward): cache})
    if not all(getattr(layer, "is_croppable", True) for layer in cache.layers):
        raise ConfigError(
            f"target: {type(target).__name__} keeps a recurrent state (state-space layers), which cannot drop "
            "rejected draft tokens, so no draft head can speculate for it; use a target with attention (or "
            "convolution) layers"
        )


def build_head(
    config: HeadConfig, target: PreTrainedModel, *, draft_token_ids: torch.Tensor | None = None
) -> MedusaHeads | EagleHead:
    """A freshly initialised head for `target`. `draft_token_ids` `(V_draft,)` is required when
    `config.draft_vocab_size` > 0."""
    vocab_size = target.get_output_embeddings().weight.shape[0]
    if config.draft_vocab_size:
        if draft_token_ids is None:
            raise ConfigError(
                f"head.draft_vocab_size: {config.draft_vocab_size} needs a draft token-id map; "
                "pass one computed from data (koala head init --draft-vocab-corpus FILE)"
            )
        if draft_token_ids.numel() != config.draft_vocab_size:
            raise ConfigError(
                f"head.draft_vocab_size: is {config.draft_vocab_size} but the token-id map holds {draft_token_ids.numel()} ids"
            )
        if int(draft_token_ids.max()) >= vocab_size or int(draft_token_ids.min()) < 0:
            raise ConfigError(f"head.draft_vocab_size: token-id map has ids outside the target vocabulary [0, {vocab_size})")
    elif draft_token_ids is not None:
        raise ConfigError("head.draft_vocab_size: is 0 (full vocabulary) but a token-id map was given")
    refuse_recurrent_state(target)
    head = HEAD_CLASSES[config.head_type](config, target=target, draft_token_ids=draft_token_ids)
    if uses_onednn_linears(target):  # the head's CPU kernels follow the target's (TargetConfig.cpu_linear)
        use_onednn_linears(head, pack_weights=packs_weights(target))
    return head


def target_identity_dict(target: PreTrainedModel, name: str) -> dict[str, Any]:
    config = target.config
    return {
        "name": name,
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "vocab_size": target.get_output_embeddings().weight.shape[0],
        "num_hidden_layers": config.num_hidden_layers,
    }


def save_head(
    head: MedusaHeads | EagleHead, directory: str | Path, *, target_identity: dict[str, Any],
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes `head.safetensors` and `head_config.json` (head config + the target's identity); `dtype` casts the
    floating-point weights (e.g. float16 for a head that ships in the repository)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).detach().contiguous().cpu()
        for name, tensor in head.state_dict().items()
    }
    save_file(tensors, directory / HEAD_WEIGHTS_FILE)
    metadata = {"format_version": FORMAT_VERSION, "head": head.config.to_dict(), "target": target_identity}
    (directory / HEAD_CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return directory


def default_drafter_dir(target_spec: str) -> Path | None:
    """The drafter shipped for a target alias (e.g. `smollm2`), or None when the project ships none for it."""
    name = DEFAULT_DRAFTERS.get(target_spec)
    return DRAFTERS_DIR / name if name else None


def read_head_metadata(directory: str | Path, *, with_weights: bool = True) -> dict[str, Any]:
    """A head directory's JSON config; the directory must hold the weights too unless `with_weights` is False (a
    registered head's config fetched on its own)."""
    directory = Path(directory)
    config_path = directory / HEAD_CONFIG_FILE
    if not directory.is_dir():
        raise HeadLoadError(f"drafter directory {directory} does not exist; create one with `koala head init`")
    needed = [HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE] if with_weights else [HEAD_CONFIG_FILE]
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise HeadLoadError(
            f"drafter directory {directory} has no {' or '.join(missing)}; it must hold {HEAD_CONFIG_FILE} and "
            f"{HEAD_WEIGHTS_FILE}; create one with `koala head init`"
        )
    try:
        metadata = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HeadLoadError(f"{config_path} is not valid JSON ({error}); export the head again") from error
    if not isinstance(metadata, dict) or not all(isinstance(metadata.get(key, {}), dict) for key in ("head", "target")):
        raise HeadLoadError(f"{config_path} is not a head config (a JSON object whose 'head' and 'target' are "
                            "objects, as `save_head` writes it); export the head again")
    return metadata


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_target_matches(saved: dict[str, Any], actual: dict[str, Any], *, directory: Path) -> None:
    for field in ("hidden_size", "vocab_size"):
        if saved.get(field) != actual[field]:
            raise HeadLoadError(
                f"head in {directory} was made for target {saved.get('name')!r} with {field}={saved.get(field)}, "
                f"but target {actual['name']!r} has {field}={actual[field]}; use a head trained for this target"
            )
    if saved.get("name") != actual["name"] or saved.get("model_type") != actual["model_type"]:
        log.warning(
            "head in %s was made for target %r (%s); loading it onto %r (%s) with matching sizes",
            directory, saved.get("name"), saved.get("model_type"), actual["name"], actual["model_type"],
        )


def inference_dtype(target: PreTrainedModel, requested: str = "auto") -> torch.dtype:
    """The dtype a loaded head drafts in. `auto`: the target's, except bf16 for an fp32 target whose linear layers
    run through oneDNN on a CPU with bf16 units. Drafts are guesses the target verifies, so their precision never
    changes the output, only (slightly) which drafts are made; a draft step that reads half the bytes is about twice
    as fast there (see pipeline/cpu_linear.py; the shipped head's drafting round on the reference CPU went from 10.6
    to 7.5 ms at the same acceptance)."""
    check_dtype(requested, field="draft_dtype")
    if requested != "auto":
        return getattr(torch, requested)
    dtype = target.get_output_embeddings().weight.dtype
    if dtype == torch.float32 and uses_onednn_linears(target) and onednn_bf16_available():
        return torch.bfloat16
    return dtype


def drafting_dtype(head: nn.Module) -> str:
    """The dtype a loaded head drafts in, as a config value (`bfloat16`): what `load_head`'s `auto` chose."""
    return str(next(head.parameters()).dtype).removeprefix("torch.")


def load_head(
    directory: str | Path, target: PreTrainedModel, *, target_name: str, dtype: str = "auto"
) -> MedusaHeads | EagleHead:
    """Loads a head saved by `save_head` onto `target` for drafting in `inference_dtype(target, dtype)`, refusing a
    head made for a different target."""
    directory = Path(directory)
    metadata = read_head_metadata(directory)
    config_path, weights_path = directory / HEAD_CONFIG_FILE, directory / HEAD_WEIGHTS_FILE
    if "head" not in metadata:
        raise HeadLoadError(f"{config_path} has no 'head' settings; export the head again")
    try:
        config = HeadConfig.from_dict(metadata["head"])
    except ConfigError as error:
        raise HeadLoadError(f"{config_path}: {error}") from error
    saved = metadata.get("target", {})
    actual = target_identity_dict(target, target_name)
    check_target_matches(saved, actual, directory=directory)
    try:
        tensors = load_file(weights_path)  # safetensors: no pickle, safe on untrusted files
    except (SafetensorError, OSError) as error:
        raise HeadLoadError(f"{weights_path} is not a readable safetensors file ({_first_line(error)}); "
                            "export the head again") from error
    draft_token_ids = tensors.get("vocabulary.draft_token_ids")
    head = build_head(config, target, draft_token_ids=draft_token_ids)
    try:
        result = head.load_state_dict(tensors, strict=False)
        mismatch = result.missing_keys or result.unexpected_keys
    except RuntimeError:  # a tensor of another shape
        mismatch = True
    if mismatch:
        raise HeadLoadError(
            f"{weights_path} does not fit a {config.head_type} head (K={config.num_layers}) on target {target_name!r} "
            f"({actual['model_type']}): the head was made for target {saved.get('name')!r} "
            f"({saved.get('model_type')}); use a head trained for this target, or export this one again"
        )
    # The fp32 master copy is for training only.
    head.to(dtype=inference_dtype(target, dtype))
    return head.eval().requires_grad_(False)
