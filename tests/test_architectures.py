"""Any Hugging Face causal LM: a matrix of tiny random targets built from configs (no downloads), one per family
users run, with the features that break Llama-only code: sliding-window layers (Mistral, Qwen2, Phi-3, Gemma),
per-layer-type rotary embeddings (Gemma-3), attention and final-logit soft-capping (Gemma-2), embedding scaling
(Gemma), q/k norms (Qwen3, Gemma-3), fused projections and partial rotary (Phi-3). For each: EAGLE K=1 and K=2 and
Medusa heads initialise, overfit one batch, and greedy speculative output equals vanilla greedy over generations
several times longer than the sliding window."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

from conftest import char_tokenizer
from pipeline.cli import main
from pipeline.config import ConfigError, DecodeConfig, HeadConfig, TrainConfig
from pipeline.caches import keep_cache_positions, new_cache, rollback_cache
from pipeline.decoding import generate, score, tree_capable
from pipeline.heads import build_head
from pipeline.losses import distill_loss
from pipeline.target import Target
from pipeline.training import KoalaTrainer, TrainBatch, pad_rows, target_features
from pipeline.trees import verify_inputs

WINDOW = 8  # sliding window of the families that have one: generations below run 5x past it
NEW_TOKENS = 40
COMMON = dict(vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
              tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),  # layer 0 full, 1-2 sliding
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=WINDOW,
                                                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=WINDOW, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW, partial_rotary_factor=0.5)),
}
# Families that shape the LM head's output: a bias (Phi), a division (Granite), a multiplication (Cohere).
SHAPED_FAMILIES = {
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25)),
}
HEADS = [("eagle", 1), ("eagle", 2), ("medusa", 1)]
PROMPTS = ["hello there, general kenobi", "Abc 12"]


def tiny_target(family: str) -> Target:
    config_class, model_class, extra = {**FAMILIES, **SHAPED_FAMILIES}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # peaked distributions: greedy decoding is not a sequence of near-ties
        model.get_output_embeddings().weight.mul_(20.0)
        model.get_output_embeddings().weight[2] = 0.0  # EOS's logit is 0, never the largest: long generations
        bias = model.get_output_embeddings().bias
        if bias is not None:  # large enough to change the argmax, EOS's kept out of reach
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)) * 20.0)
            bias[2] = -1e4
    return Target(model=model.eval().requires_grad_(False), tokenizer=char_tokenizer(), name=f"tiny-{family}",
                  prompt_format="plain")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_target(request) -> Target:
    return tiny_target(request.param)


@pytest.fixture(scope="module")
def vanilla(family_target):
    config = DecodeConfig(max_new_tokens=NEW_TOKENS)
    return {p: generate(family_target, family_target.encode_prompt(p), config=config).token_ids for p in PROMPTS}


def test_our_vanilla_decoding_equals_hf_generate_past_the_window(family_target, vanilla):
    for prompt, ours in vanilla.items():
        ids = family_target.encode_prompt(prompt)
        with torch.inference_mode():
            reference = family_target.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=2,
            )[0, ids.shape[1]:].tolist()
        assert ours == reference[: len(ours)] and len(ours) > 2 * WINDOW


@pytest.mark.parametrize("head_type,num_layers", HEADS)
@pytest.mark.parametrize("tree", ["chain", "static", "dynamic"])
def test_greedy_speculative_equals_vanilla(family_target, vanilla, head_type, num_layers, tree, caplog):
    torch.manual_seed(num_layers)
    head = build_head(HeadConfig(head_type=head_type, num_layers=num_layers, num_heads=3), family_target.model)
    config = DecodeConfig(max_new_tokens=NEW_TOKENS, tree=tree, tree_nodes=6)
    with caplog.at_level(logging.WARNING, logger="pipeline.decoding"):
        for prompt, expected in vanilla.items():
            result = generate(family_target, family_target.encode_prompt(prompt), config=config, drafter=head)
            assert result.token_ids == expected
            assert result.stats.draft_tokens > 0
    drafted_chains = "cannot verify trees" in caplog.text
    assert drafted_chains == (tree != "chain" and not tree_capable(family_target.model))


@pytest.mark.parametrize("head_type,num_layers", HEADS)
def test_heads_initialise_and_overfit_one_batch(family_target, head_type, num_layers):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(4):
        ids = torch.randint(3, 80, (24 - index,), generator=generator).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 8 + [1] * (len(ids) - 8)})
    input_ids, loss_mask = pad_rows(rows, max_seq_len=64)
    batch = TrainBatch(input_ids, loss_mask, target_features(family_target.model, input_ids, loss_mask))
    torch.manual_seed(0)
    head_config = HeadConfig(head_type=head_type, num_layers=num_layers, num_heads=3)
    head = build_head(head_config, family_target.model).requires_grad_(True)
    unroll = {"unroll_depth": 2} if head_type == "eagle" else {}  # training-time test through the target's layers
    trainer = KoalaTrainer(TrainConfig(data_dirs=("unused",), head=head_config, head_lr=3e-3, **unroll), head=head,
                           target_model=family_target.model)
    before = trainer.evaluate([batch])
    first = trainer.train_step(batch)
    for _ in range(40):
        last = trainer.train_step(batch)
    after = trainer.evaluate([batch])
    # The loss is a soft-label cross-entropy: its floor is the target's own entropy (high under a soft cap).
    with torch.no_grad():
        predictions = trainer.predict(batch)
        target_probs = torch.softmax(predictions.target_logits.float(), dim=-1)
        floor = float(distill_loss(predictions.target_logits, target_probs, predictions.weights))
    assert last["loss_distill"] - floor < 0.5 * (first["loss_distill"] - floor), (first, last, floor)
    assert after["val_acc_1"] > before["val_acc_1"]


def test_eagle_head_with_a_draft_vocabulary(family_target, vanilla):
    token_ids = torch.arange(2, 60)  # the cut keeps EOS
    head = build_head(HeadConfig(head_type="eagle", draft_vocab_size=len(token_ids)), family_target.model,
                      draft_token_ids=token_ids)
    assert head.lm_head_weight.shape[0] == len(token_ids)
    prompt = PROMPTS[0]
    result = generate(family_target, family_target.encode_prompt(prompt), config=DecodeConfig(max_new_tokens=NEW_TOKENS),
                      drafter=head)
    assert result.token_ids == vanilla[prompt]


def test_draft_logits_are_soft_capped_like_the_targets():
    """Gemma-2 caps its logits (tanh); a head that did not would train against, and sample from, another shape."""
    target = tiny_target("gemma2")
    features = torch.randn(1, 5, 64) * 30
    expected = target.model.lm_head(features)
    expected = torch.tanh(expected / 30.0) * 30.0
    assert expected.abs().max() > 25  # the cap is in play
    eagle = build_head(HeadConfig(head_type="eagle"), target.model)
    torch.testing.assert_close(eagle.logits(features), expected)
    medusa = build_head(HeadConfig(head_type="medusa", num_heads=1), target.model)  # a fresh block is the identity
    torch.testing.assert_close(medusa(features)[0], expected)


@pytest.mark.parametrize("family", sorted(SHAPED_FAMILIES))
def test_draft_and_distillation_logits_are_shaped_like_the_targets(family):
    """A head drafts through the target's LM head rows; its logits (and training's target logits) must be the
    target's own, bias, scale and cap included, or it drafts (and learns) another distribution."""
    target = tiny_target(family)
    ids = target.encode_prompt(PROMPTS[0])
    with torch.no_grad():
        outputs = target.model(ids, output_hidden_states=True)
    last_hidden, expected = outputs.hidden_states[-1], outputs.logits
    medusa = build_head(HeadConfig(head_type="medusa", num_heads=1), target.model)  # a fresh block is the identity
    heads = [medusa]
    if family != "phi":  # Phi's decoder has no `norm` (final_layernorm): EAGLE is refused for it
        heads.append(build_head(HeadConfig(head_type="eagle"), target.model))
    trainer = KoalaTrainer(TrainConfig(data_dirs=("unused",), head=medusa.config), head=medusa,
                           target_model=target.model)
    with torch.no_grad():
        torch.testing.assert_close(medusa(last_hidden)[0], expected)
        for head in heads[1:]:
            torch.testing.assert_close(head.logits(last_hidden), expected)
        torch.testing.assert_close(trainer._target_logits(last_hidden), expected)
        assert torch.equal(trainer.target_greedy(last_hidden), expected.argmax(-1))


@pytest.mark.parametrize("family", sorted(SHAPED_FAMILIES))
def test_greedy_speculative_equals_vanilla_on_targets_with_shaped_logits(family):
    target = tiny_target(family)
    head_types = ["medusa"] if family == "phi" else ["medusa", "eagle"]
    for prompt in PROMPTS:
        ids = target.encode_prompt(prompt)
        expected = generate(target, ids, config=DecodeConfig(max_new_tokens=NEW_TOKENS)).token_ids
        for head_type in head_types:
            torch.manual_seed(0)
            head = build_head(HeadConfig(head_type=head_type, num_heads=3), target.model)
            for tree in ("chain", "dynamic"):
                config = DecodeConfig(max_new_tokens=NEW_TOKENS, tree=tree, tree_nodes=6)
                result = generate(target, ids, config=config, drafter=head)
                assert result.token_ids == expected and result.stats.draft_tokens > 0


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": i, "category": "writing", "turns": [text]})
                              for i, text in enumerate(PROMPTS)) + "\n")
    return path


@pytest.mark.parametrize("family", ["gemma3", "mistral", "phi3"])
def test_head_init_and_bench_on_a_saved_model_directory(family, questions, tmp_path):
    """As a user would: a model directory of the family, `koala head init` (EAGLE, K=2), `koala bench`."""
    model_dir, head_dir, report_path = tmp_path / "model", tmp_path / "head", tmp_path / "bench.json"
    target = tiny_target(family)
    target.model.save_pretrained(model_dir)
    target.tokenizer.save_pretrained(model_dir)
    assert main(["head", "init", "--type", "eagle", "--num-layers", "2", "--target", str(model_dir),
                 "--out", str(head_dir)]) == 0
    assert main(["bench", "--target", str(model_dir), "--drafter", str(head_dir), "--questions", str(questions),
                 "--max-new-tokens", str(NEW_TOKENS), "--no-hf", "--tree", "chain", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["n_prompts"] == len(PROMPTS) and report["exact_match"] == 1.0


def test_a_target_without_rotary_decoder_layers_refuses_eagle_in_one_line_and_runs_medusa(tmp_path, capsys):
    """GPT-2 (learned absolute positions, no rotary module) cannot host an EAGLE head: `koala head init` says so
    up front and suggests Medusa, whose heads then decode losslessly, trees included."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=80, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2))
    model_dir = tmp_path / "gpt2"
    model.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    assert main(["head", "init", "--type", "eagle", "--target", str(model_dir), "--out", str(tmp_path / "e")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (not progress bars)
    assert len(errors) == 1 and errors[0].startswith("koala head: error:"), errors
    assert "rotary" in errors[0] and "--type medusa" in errors[0]

    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    target = Target(model=model.eval(), tokenizer=char_tokenizer(), name="tiny-gpt2", prompt_format="plain")
    ids = target.encode_prompt(PROMPTS[0])
    expected = generate(target, ids, config=DecodeConfig(max_new_tokens=NEW_TOKENS)).token_ids
    for tree in ("chain", "static", "dynamic"):
        head = build_head(HeadConfig(head_type="medusa", num_heads=3), model)
        result = generate(target, ids, config=DecodeConfig(max_new_tokens=NEW_TOKENS, tree=tree, tree_nodes=6),
                          drafter=head)
        assert result.token_ids == expected and result.stats.draft_tokens > 0


def test_a_learned_position_table_is_never_indexed_past_the_context_window(monkeypatch):
    """On a CPU where 4 rows verify faster than 2, a 2-row verification is padded to 4; three positions before the
    end of GPT-2's position table that padding indexed past it (IndexError) while vanilla decoding finished."""
    import pipeline.decoding as decoding

    costs = {2: 2.0, 3: 3.0, 4: 1.0}
    monkeypatch.setattr(decoding, "verify_costs", lambda model, sizes: {k: costs[k] for k in sizes})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=80, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2)).eval()
    target = Target(model=model, tokenizer=char_tokenizer(), name="tiny-gpt2", prompt_format="plain")
    ids = target.encode_prompt(PROMPTS[0])
    assert ids.shape[1] < 29  # decoding runs into the window's end
    config = DecodeConfig(max_new_tokens=100, tree="chain", lookup_tokens=0)
    expected = generate(target, ids, config=config)
    assert expected.finish_reason == "length" and ids.shape[1] + len(expected.token_ids) >= 31
    head = build_head(HeadConfig(head_type="medusa", num_heads=1), model)  # 2-row verifications: padded to 4
    assert generate(target, ids, config=config, drafter=head).token_ids == expected.token_ids


def test_the_auto_tree_budget_stays_inside_a_short_learned_position_table():
    """The default decoding settings (trees with an `auto` node budget) on a GPT-2 whose position table has 64
    rows: speculative output equals vanilla's up to the window's end, never an IndexError from the embedding."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=80, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)).eval()
    target = Target(model=model, tokenizer=char_tokenizer(), name="tiny-gpt2", prompt_format="plain")
    ids = target.encode_prompt(PROMPTS[0])
    config = DecodeConfig(max_new_tokens=100)
    expected = generate(target, ids, config=config)
    assert expected.finish_reason == "length" and ids.shape[1] + len(expected.token_ids) <= 64
    head = build_head(HeadConfig(head_type="medusa", num_heads=3), model)
    assert generate(target, ids, config=config, drafter=head).token_ids == expected.token_ids


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "qwen2", "phi3"])
def test_tree_pass_past_the_window_equals_running_the_accepted_path(family):
    """Sliding-window targets verify trees too: the tree pass's rows for the accepted path equal a plain pass
    over it, and the cache keeps exactly that path (sliding layers trimmed to their window) once the context is
    twice the window."""
    model = tiny_target(family).model
    assert tree_capable(model)
    prefix = torch.randint(3, 80, (1, 2 * WINDOW + 3), generator=torch.Generator().manual_seed(0))
    tokens, parents = [7, 8, 20, 21, 22], [-1, -1, 1, 2, 1]  # the path 1 -> 2 -> 3 is in a non-first branch
    cache = new_cache(model.config)
    with torch.inference_mode():
        score(model, prefix, cache, last_logits_only=True, want_features=False)
        ids, positions, allowed = verify_inputs(30, tokens, parents, cached=prefix.shape[1], device=torch.device("cpu"))
        tree = score(model, ids, cache, last_logits_only=False, want_features=True, position_ids=positions,
                     allowed=allowed)
        keep_cache_positions(cache, prefix.shape[1] + 1, [1, 2, 3])
        reference = new_cache(model.config)
        path = torch.tensor([[30, 8, 20, 21]])
        linear = score(model, torch.cat([prefix, path], dim=1), reference, last_logits_only=False, want_features=True)
        rollback_cache(reference, reference.get_seq_length())  # a sliding layer's own trim after a forward
    torch.testing.assert_close(tree.logits[[0, 2, 3, 4]], linear.logits[-4:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tree.features[0, [0, 2, 3, 4]], linear.features[0, -4:], atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == reference.get_seq_length() == prefix.shape[1] + 4
    assert any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    for ours, theirs in zip(cache.layers, reference.layers):
        assert ours.keys.shape == theirs.keys.shape
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tree", ["chain", "static"])
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_speculative_sampling_runs_past_the_window(family, tree):
    """Sampled chains and (drawn) trees: their rollbacks on sliding-window layers must hold past the window too."""
    target = tiny_target(family)
    target.model.generation_config.eos_token_id = target.model.config.vocab_size  # no token ends a sampled run early
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), target.model)
    config = DecodeConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0, tree=tree)
    result = generate(target, target.encode_prompt(PROMPTS[0]), config=config, drafter=head)
    assert len(result.token_ids) == NEW_TOKENS and result.stats.draft_tokens > 0
    assert (result.stats.tree_nodes > 0) == (tree == "static")


def test_sliding_window_targets_are_refused_where_transformers_cannot_roll_them_back(monkeypatch):
    """transformers 5.0's sliding-window cache layers cannot be cropped once full: refuse in one line instead."""
    from transformers import DynamicCache

    owner = next(cls for cls in DynamicCache.__mro__ if "activate_past_recording" in vars(cls))
    monkeypatch.delattr(owner, "activate_past_recording")
    mistral = tiny_target("mistral")
    with pytest.raises(ConfigError, match="upgrade transformers"):
        generate(mistral, mistral.encode_prompt(PROMPTS[0]), config=DecodeConfig(max_new_tokens=4))
    llama = tiny_target("llama")  # full-attention targets need no past recording
    assert len(generate(llama, llama.encode_prompt(PROMPTS[0]), config=DecodeConfig(max_new_tokens=4)).token_ids) == 4


def test_a_target_with_convolution_layers_decodes_losslessly_with_medusa_chains():
    """LFM2 interleaves short convolutions with attention: their cached states roll back only while transformers
    records them (as sliding layers), so rejected drafts were a RuntimeError on the first rejection. Trees stay
    refused (chains are drafted); EAGLE is refused in one line (no `model.norm` to reuse)."""
    torch.manual_seed(0)
    config = transformers.Lfm2Config(**{**COMMON, "layer_types": ["conv", "full_attention", "conv"]})
    model = transformers.Lfm2ForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
        model.get_output_embeddings().weight[2] = 0.0
    target = Target(model=model.eval().requires_grad_(False), tokenizer=char_tokenizer(), name="tiny-lfm2",
                    prompt_format="plain")
    assert not tree_capable(target.model)
    head = build_head(HeadConfig(head_type="medusa", num_heads=3), target.model)
    for prompt in PROMPTS:
        ids = target.encode_prompt(prompt)
        vanilla = generate(target, ids, config=DecodeConfig(max_new_tokens=NEW_TOKENS)).token_ids
        result = generate(target, ids, config=DecodeConfig(max_new_tokens=NEW_TOKENS), drafter=head)
        assert result.token_ids == vanilla
        assert sum(result.stats.accepted) < sum(result.stats.drafted)  # drafts were rejected and rolled back
    with pytest.raises(ConfigError, match="Use --type medusa"):
        build_head(HeadConfig(head_type="eagle"), target.model)


def test_a_cache_with_recurrent_state_layers_is_refused_in_one_line_not_rolled_back_wrongly():
    class RecurrentLayer:  # what transformers reports for a layer holding a recurrent (Mamba-style) state
        is_croppable = False

    class Cache:
        layers = [RecurrentLayer()]

        def get_seq_length(self):
            return 10

        def crop(self, _):
            raise AssertionError("a recurrent state must not be cropped")

    with pytest.raises(ConfigError, match="recurrent-state layers"):
        rollback_cache(Cache(), 8)


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
def test_a_state_space_target_is_refused_in_one_line_when_a_head_is_made_for_it(head_type, tmp_path, capsys):
    """Mamba folds every token into one recurrent state: a rejected draft cannot be taken back out, so no head
    can draft for it. `koala head init` (and every head load, which builds the head) says so up front instead of
    suggesting Medusa or failing deep inside decoding."""
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=80, hidden_size=64, state_size=8, num_hidden_layers=2, bos_token_id=1, eos_token_id=2))
    with pytest.raises(ConfigError, match="MambaForCausalLM keeps a recurrent state"):
        build_head(HeadConfig(head_type=head_type), model.eval())
    model.save_pretrained(tmp_path / "mamba")
    char_tokenizer().save_pretrained(tmp_path / "mamba")
    assert main(["head", "init", "--type", head_type, "--target", str(tmp_path / "mamba"),
                 "--out", str(tmp_path / "head")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("koala head: error:"), errors
    assert "recurrent state" in errors[0] and "cannot drop rejected draft tokens" in errors[0]
