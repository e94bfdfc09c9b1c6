"""KV caches that speculative decoding can roll back, for every layer kind transformers' `DynamicCache` builds.

- Full-attention layers keep every position: rollback is transformers' `crop`, keeping a tree's accepted path is a
  gather of positions.
- Sliding-window layers (Mistral, Qwen2, Phi-3, the local layers of Gemma-2/3) normally keep only their last
  `window - 1` positions, so rejected drafts could not be dropped once the window is full. transformers' own past
  recording (`activate_past_recording`) keeps what a forward appends until the next `crop`, which drops the
  rejected positions and trims the layer back to its window; `rollback_cache` therefore crops after every
  verification, even when nothing was rejected.
- A tree verify pass gives each layer type its own 4D pattern (`tree_attention`): full layers see the whole
  context, sliding layers the keys they hold, restricted to each node's window.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
import transformers
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from pipeline.config import ConfigError

FULL, SLIDING = "full_attention", "sliding_attention"


def has_sliding_layers(cache: DynamicCache) -> bool:
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", []))


def has_linear_attention_layers(cache: DynamicCache) -> bool:
    """Convolution or linear-attention layers (LFM2, Qwen3-Next, ...): their states roll back only while recorded."""
    return any(hasattr(layer, "conv_states") for layer in getattr(cache, "layers", []))


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """A KV cache for a model with `config` that `rollback_cache` and `keep_cache_positions` can roll back."""
    cache = DynamicCache(config=config)
    if has_linear_attention_layers(cache):
        cache.activate_past_recording()  # conv states kept until the next crop, which drops the rejected ones
    if has_sliding_layers(cache):
        if not hasattr(cache, "activate_past_recording"):
            raise ConfigError(
                f"target: {getattr(config, 'model_type', 'this model')} has sliding-window attention layers, whose "
                f"cache transformers {transformers.__version__} cannot roll back; upgrade transformers (5.17 and "
                "later have the cache API it needs, activate_past_recording)"
            )
        cache.activate_past_recording()
    return cache


def _recording(cache: DynamicCache) -> bool:
    return any(getattr(layer, "record_past", False) for layer in getattr(cache, "layers", []))


def rollback_cache(cache: DynamicCache, length: int) -> None:
    """Drops every cached position from `length` on (transformers' own crop); sliding-window layers that record
    their past are trimmed back to their window too, so the crop runs even when nothing is dropped."""
    surplus = cache.get_seq_length() - length
    if surplus > 0 and not all(getattr(layer, "is_croppable", True) for layer in getattr(cache, "layers", [])):
        # A recurrent state (Mamba-style layers) folds every token in: rejected drafts cannot be taken out.
        raise ConfigError("target: its cache has recurrent-state layers, which cannot drop rejected draft tokens; "
                          "speculative decoding needs a target whose every layer can be rolled back")
    if surplus > 0 or _recording(cache):
        cache.crop(-surplus)


def keep_cache_positions(cache: DynamicCache, start: int, keep: Sequence[int]) -> None:
    """Keeps cache positions [0, start) and start + keep[i] (in that order), dropping the rest of what the verify
    pass appended. A chain's prefix is a crop; a tree's path is gathered on every layer (a sliding-window layer
    then goes back to its last `window - 1` positions, as its own crop would leave it)."""
    if list(keep) == list(range(len(keep))):
        rollback_cache(cache, start + len(keep))
        return
    for layer in cache.layers:
        sliding = getattr(layer, "is_sliding", False)
        if not hasattr(layer, "keys") or (sliding and not getattr(layer, "record_past", False)):
            raise ConfigError(
                f"decode.tree: the target's cache layer {type(layer).__name__} cannot keep a tree path; "
                "use chain drafting (tree: chain) for this target"
            )
        appended = layer.get_seq_length() - start  # the verify pass's tree nodes, last in the layer
        held = layer.keys.shape[-2]
        index = torch.cat([torch.arange(held - appended), held - appended + torch.tensor(list(keep), dtype=torch.long)])
        index = index.to(layer.keys.device)
        if sliding:
            index = index[-(layer.sliding_window - 1):]
            layer.cumulative_length = start + len(keep)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def _layer_kinds(model: PreTrainedModel, cache: DynamicCache | None = None) -> list[str]:
    """The attention kind of every decoder layer as the model's masks are keyed: config.layer_types where the
    config has them, else all full or (a `sliding_window` and no layer types: Mistral, Phi-3) all sliding, as the
    model's cache (`cache`, or a new one) lays its layers out."""
    config = model.config
    if getattr(config, "layer_types", None):
        return list(config.layer_types)
    sliding = has_sliding_layers(cache if cache is not None else DynamicCache(config=config))
    return [SLIDING if sliding else FULL] * config.num_hidden_layers


@functools.cache
def _accepts_mask_mapping(decoder_class: type) -> bool:
    # Models with several layer types build one mask per type unless handed a ready {layer type: mask} mapping;
    # whether a decoder takes one is only visible in its forward's source.
    try:
        return "causal_mask_mapping := attention_mask, dict" in inspect.getsource(decoder_class.forward)
    except (OSError, TypeError):
        return False


def tree_incapability(model: PreTrainedModel) -> str | None:
    """Why the target cannot verify a tree in one pass, or None when it can."""
    implementation = model.config._attn_implementation or "sdpa"
    if implementation.startswith("flash"):
        return f"{implementation} takes no 4D attention masks"
    kinds = set(_layer_kinds(model))
    if not kinds <= {FULL, SLIDING}:
        return f"its layer types {sorted(kinds - {FULL, SLIDING})} have no tree mask here"
    if len(kinds) > 1 and not _accepts_mask_mapping(type(model.get_decoder())):
        return "its decoder takes no per-layer-type masks"
    if SLIDING in kinds and not hasattr(DynamicCache, "activate_past_recording"):
        return "this transformers cannot roll back sliding-window layers"
    return None


def tree_attention(
    model: PreTrainedModel, allowed: torch.Tensor, positions: torch.Tensor, *, cached: int,
    cache: DynamicCache | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The boolean "query may attend key" pattern of a tree verify pass, `(1, 1, n, cached + n)` over [cache, pending,
    nodes], as the target's layers need it: as it is for full attention; for sliding-window layers restricted to
    keys within each query's window (`key position > query position - window`, transformers' own rule) and cut to
    the keys such a layer holds during the pass (its last `window - 1` cached positions and the n new ones). A model
    with several layer types gets a {layer type: pattern} mapping. Pass the target's `cache` to read its layer kinds
    from it (else a throwaway cache is built to find them)."""
    kinds = _layer_kinds(model, cache)
    patterns = {}
    for kind in set(kinds):
        if kind == FULL:
            patterns[kind] = allowed
            continue
        window = model.config.sliding_window
        length = positions.shape[1]
        key_positions = torch.cat([torch.arange(cached, device=positions.device), positions[0]])
        within = key_positions[None, :] > positions[0][:, None] - window
        patterns[kind] = (allowed & within)[..., -min(cached + length, window - 1 + length):]
    return patterns if getattr(model.config, "layer_types", None) else patterns[kinds[0]]
