"""The KOALA trainer without Ray: heads overfit a batch, resume equals an uninterrupted run, validation is sane."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import make_tiny_target
from pipeline.config import ConfigError, DecodeConfig, HeadConfig, TrainConfig
from pipeline.decoding import generate
from pipeline.heads import build_head
from pipeline.training import KoalaTrainer, LoopHooks, TrainBatch, iterate_batches, pad_rows, replay_chain_decoding, target_features


def _rows(target, count=4, length=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        ids = torch.randint(3, target.model.config.vocab_size, (length - index,), generator=generator).tolist()
        half = len(ids) // 2
        rows.append({"prompt_id": f"p{index}", "input_ids": ids, "loss_mask": [0] * half + [1] * (len(ids) - half)})
    return rows


def _batch(target, rows, extra_layers=()):
    input_ids, loss_mask = (t.to(target.device) for t in pad_rows(rows, max_seq_len=64))
    return TrainBatch(input_ids, loss_mask, target_features(target.model, input_ids, loss_mask, extra_layers))


def _trainer(target, head_type, adv_weight, extra_layers=(), total_steps=0, **overrides):
    torch.manual_seed(0)
    head_config = HeadConfig(head_type=head_type, num_layers=2, num_heads=3, extra_feature_layers=extra_layers)
    config = TrainConfig(data_dirs=("unused",), head=head_config, adv_weight=adv_weight, head_lr=3e-3,
                         discriminator_hidden_size=32, **overrides)
    head = build_head(head_config, target.model).requires_grad_(True)
    return KoalaTrainer(config, head=head, target_model=target.model, total_steps=total_steps)


def test_padding_never_carries_loss():
    input_ids, loss_mask = pad_rows([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
                                     {"input_ids": [5], "loss_mask": [1]}], max_seq_len=8)
    assert input_ids.shape == (2, 3)
    assert loss_mask.tolist() == [[False, True, True], [True, False, False]]


def test_features_of_right_padded_rows_equal_unpadded(tiny_target):
    rows = _rows(tiny_target)
    batch = _batch(tiny_target, rows)
    alone = _batch(tiny_target, rows[3:])
    length = len(rows[3]["input_ids"])
    torch.testing.assert_close(batch.features[3, :length], alone.features[0, :length], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
@pytest.mark.parametrize("adv_weight", [0.0, 0.1])
def test_head_overfits_one_batch(tiny_target, head_type, adv_weight):
    trainer = _trainer(tiny_target, head_type, adv_weight)
    batch = _batch(tiny_target, _rows(tiny_target))
    first = trainer.train_step(batch)
    for _ in range(60):
        last = trainer.train_step(batch)
    assert last["loss_distill"] < 0.5 * first["loss_distill"], (first, last)
    if adv_weight:
        assert {"loss_adv_g", "loss_adv_d", "d_accuracy"} <= set(last)
    else:
        assert "loss_adv_g" not in last and trainer.discriminator is None
    before = _trainer(tiny_target, head_type, adv_weight).evaluate([batch])
    after = trainer.evaluate([batch])
    assert after["val_acc_1"] > before["val_acc_1"]
    assert all(0 <= after[f"val_acc_{n}"] <= 1 for n in (1, 2, 3) if after[f"val_acc_{n}"] is not None)
    assert after["val_loss_distill"] < before["val_loss_distill"]


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
def test_resumed_training_ends_where_uninterrupted_training_does(tiny_target, tmp_path, head_type):
    # A warm-up of 2 steps in a 4-step schedule: the rate after a resume must be the schedule's, not its first value.
    batches = [_batch(tiny_target, _rows(tiny_target, seed=s)) for s in range(4)]
    schedule = {"total_steps": 4, "warmup_fraction": 0.5, "feature_noise": 0.2 if head_type == "eagle" else 0.0}
    uninterrupted = _trainer(tiny_target, head_type, 0.1, **schedule)
    rates = [uninterrupted.train_step(batch)["lr"] for batch in batches]

    first_half = _trainer(tiny_target, head_type, 0.1, **schedule)
    for batch in batches[:2]:
        first_half.train_step(batch)
    first_half.save_state(tmp_path)
    resumed = _trainer(tiny_target, head_type, 0.1, **schedule)
    resumed.load_state(tmp_path)
    assert resumed.step == 2
    assert resumed.head_optimizer.param_groups[0]["lr"] == pytest.approx(rates[2])
    assert [resumed.train_step(batch)["lr"] for batch in batches[2:]] == pytest.approx(rates[2:])
    for (name, expected), actual in zip(uninterrupted.head_module.state_dict().items(),
                                        resumed.head_module.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)


@pytest.mark.parametrize("g_steps", [1, 3])
def test_learning_rate_schedule_counts_training_steps_whatever_g_steps(tiny_target, g_steps):
    # The schedule's length is in training steps; extra generator steps must not run it down early.
    batch = _batch(tiny_target, _rows(tiny_target))
    trainer = _trainer(tiny_target, "eagle", 0.0, total_steps=10, warmup_fraction=0.2, g_steps=g_steps,
                       lr_schedule="linear", min_lr_ratio=0.0)
    rates = [trainer.train_step(batch)["lr"] / 3e-3 for _ in range(10)]
    assert rates == pytest.approx([0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])


def test_batch_order_is_a_function_of_seed_and_epoch():
    rows = [{}] * 10
    first = list(iterate_batches(rows, batch_size=3, seed=1, epoch=0))
    assert first == list(iterate_batches(rows, batch_size=3, seed=1, epoch=0))
    assert first != list(iterate_batches(rows, batch_size=3, seed=1, epoch=1))
    assert sorted(i for batch in first for i in batch) == list(range(10))


def test_draft_vocabulary_head_trains(tiny_target):
    token_ids = torch.arange(3, 40)
    head_config = HeadConfig(head_type="eagle", draft_vocab_size=len(token_ids))
    config = TrainConfig(data_dirs=("unused",), head=head_config, adv_weight=0.1, head_lr=3e-3)
    head = build_head(head_config, tiny_target.model, draft_token_ids=token_ids).requires_grad_(True)
    trainer = KoalaTrainer(config, head=head, target_model=tiny_target.model)
    assert trainer.target_rows.shape[0] == len(token_ids)
    batch = _batch(tiny_target, _rows(tiny_target))
    first = trainer.train_step(batch)
    for _ in range(40):
        last = trainer.train_step(batch)
    assert last["loss_distill"] < first["loss_distill"]
    assert trainer.evaluate([batch])["val_acc_1"] is not None


def test_the_draft_vocabulary_keeps_every_eos_id_generate_stops_at(tmp_path):
    """Ray's driver picks the draft vocabulary without loading the target: it keeps the EOS ids of the generation
    config, as `koala train --no-ray` does from the loaded target (it kept only the tokenizer's EOS)."""
    from conftest import char_tokenizer, tiny_llama
    from pipeline.config import TargetConfig
    from pipeline.stages.train import _eos_ids
    from pipeline.target import load_target

    model = tiny_llama()
    model.generation_config.eos_token_id = [2, 7]  # e.g. Llama-3 and Qwen2.5 chat models stop at two or three ids
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    config = TrainConfig(data_dirs=("unused",), target=TargetConfig(spec=str(tmp_path)))
    assert _eos_ids(config) == sorted(load_target(str(tmp_path), device="cpu").eos_token_ids) == [2, 7]


def test_the_draft_vocabulary_is_a_function_of_the_counts_not_their_order():
    """Tokens tied in frequency at the size's edge are taken by id: the counts read from token_freq.json, counted
    from the shards, or from the data directories in another order pick the same vocabulary."""
    from collections import Counter

    from pipeline.vocab import top_token_ids

    counts = {5: 3, 9: 2, 4: 2, 7: 2, 1: 1}
    orders = [Counter(dict(sorted(counts.items(), key=key))) for key in (
        lambda item: item[0], lambda item: -item[0], lambda item: (item[1], item[0]), lambda item: str(item[0]))]
    assert {tuple(top_token_ids(c, 3).tolist()) for c in orders} == {(4, 5, 7)}
    assert {tuple(top_token_ids(c, 3, always_include=[2]).tolist()) for c in orders} == {(2, 4, 5)}


def test_fp32_master_weights_move_under_bf16_autocast():
    """Defect 1: on a bf16 target the head trains fp32 master weights under bf16 autocast. A bf16 norm weight at
    1.0 cannot take a 1e-3 step (bf16's spacing at 1.0 is 2**-7), so before the fix it never moved."""
    assert torch.tensor(1.0, dtype=torch.bfloat16) + 1e-3 == 1.0  # the premise
    target = make_tiny_target(seed=2)
    target.model.to(torch.bfloat16)
    head_config = HeadConfig(head_type="eagle", num_layers=1)
    config = TrainConfig(data_dirs=("unused",), head=head_config, head_lr=1e-3, precision="bfloat16", grad_clip=0)
    head = build_head(head_config, target.model).requires_grad_(True)
    trainer = KoalaTrainer(config, head=head, target_model=target.model)
    norm = head.layers[0].input_layernorm.weight
    assert norm.dtype == torch.float32 and trainer.autocast_dtype == torch.bfloat16
    before = norm.detach().clone()
    batch = _batch(target, _rows(target))
    batch.features = batch.features.to(torch.bfloat16)
    for _ in range(3):
        trainer.train_step(batch)
    assert (norm.detach() - before).abs().max() > 1e-4


def test_adversarial_training_does_not_collapse(tiny_target):
    """Defect 3: head + discriminator trained for 300 steps on a fixed tiny setup keep finite losses and a
    discriminator that tells draft from target better than chance but not perfectly (0.5 < accuracy < 1)."""
    torch.manual_seed(0)
    head_config = HeadConfig(head_type="eagle", num_layers=1)
    # Unrolled drafts keep the tiny head imperfect, so there is something for the discriminator to tell apart.
    config = TrainConfig(data_dirs=("unused",), head=head_config, adv_weight=0.3, adv_warmup_steps=50,
                         head_lr=1e-3, discriminator_lr=1e-3, unroll_depth=3)
    head = build_head(head_config, tiny_target.model).requires_grad_(True)
    trainer = KoalaTrainer(config, head=head, target_model=tiny_target.model, total_steps=300)
    batches = [_batch(tiny_target, _rows(tiny_target, count=6, length=40, seed=s)) for s in range(4)]
    history = [trainer.train_step(batches[step % 4]) for step in range(300)]
    for metrics in history:
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        assert metrics["loss_adv_d"] < 5, metrics  # the collapse this replaced sat at 28
    after_warmup = [m["d_accuracy"] for m in history[100:]]
    mean_accuracy = sum(after_warmup) / len(after_warmup)
    assert 0.5 < mean_accuracy < 1.0, mean_accuracy
    before = {k: v.clone() for k, v in trainer.discriminator_module.state_dict().items()}
    assert 0.5 < trainer.evaluate(batches)["val_d_accuracy"] < 1.0
    # validation (rank 0 only under DDP) leaves the discriminator as it was: no spectral-norm power iterations
    after = trainer.discriminator_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.discriminator_module.training


def test_fp16_scales_the_discriminators_loss_too(tiny_target, tmp_path):
    """fp16 autocast (GPUs without bf16) needs loss scaling for the discriminator as for the head: its update goes
    through its own scaler, whose state a resume restores."""
    trainer = _trainer(tiny_target, "eagle", 0.1, precision="float16")
    scaled = []
    original = trainer.discriminator_scaler.scale
    trainer.discriminator_scaler.scale = lambda loss: scaled.append(float(loss.detach())) or original(loss)
    batch = _batch(tiny_target, _rows(tiny_target))
    metrics = trainer.train_step(batch)
    assert scaled and math.isfinite(metrics["loss_adv_d"]) and trainer.discriminator_scaler.is_enabled()
    trainer.discriminator_scaler.update(1024.0)
    trainer.save_state(tmp_path)
    resumed = _trainer(tiny_target, "eagle", 0.1, precision="float16")
    resumed.load_state(tmp_path)
    assert resumed.discriminator_scaler.get_scale() == 1024.0


def test_a_run_that_spent_its_time_budget_trains_no_more_when_run_again(tiny_target):
    from pipeline.training import FeatureStore, LoopHooks, run_training_loop

    rows = _rows(tiny_target, count=8)
    trainer = _trainer(tiny_target, "eagle", 0.0, batch_size=2, epochs=3, max_train_seconds=5.0)
    trainer.step, trainer.train_seconds = 1, 5.2  # as a checkpoint of a run that ran out of time leaves it
    store = FeatureStore.build(tiny_target.model, rows, max_seq_len=64, progress=False)
    metrics = run_training_loop(trainer, train_rows=rows, features=store, validate=lambda: {"val_tau": 1.5},
                                hooks=LoopHooks())
    assert trainer.step == 1 and metrics["step"] == 1 and metrics["val_tau"] == 1.5


def test_the_last_report_describes_the_exported_head_not_the_last_epoch(tiny_target):
    """With select_best the exported head is the best epoch's: the final metrics (a sweep's trial row, Ray's
    result) carry its validation figures, the last epoch's as last_val_*; the logged curve keeps every epoch."""
    from pipeline.training import FeatureStore, LoopHooks, run_training_loop

    rows = _rows(tiny_target, count=4)
    trainer = _trainer(tiny_target, "eagle", 0.0, batch_size=2, epochs=2)
    store = FeatureStore.build(tiny_target.model, rows, max_seq_len=64, progress=False)
    epochs = iter([{"val_tau": 2.0, "val_acc_1": 0.6}, {"val_tau": 1.5, "val_acc_1": 0.4}])
    logged, reported = [], []
    final = run_training_loop(trainer, train_rows=rows, features=store, validate=lambda: next(epochs),
                              hooks=LoopHooks(log=lambda m, step: logged.append(dict(m)),
                                              checkpoint=lambda m: reported.append(dict(m))))
    assert (final["val_tau"], final["val_acc_1"], final["best_epoch"]) == (2.0, 0.6, 0.0)
    assert (final["last_val_tau"], final["last_val_acc_1"]) == (1.5, 0.4)
    assert reported[-1] == final
    assert [m["val_tau"] for m in logged if "val_tau" in m] == [2.0, 1.5]


def test_validation_keeps_the_best_epoch_for_export(tiny_target):
    trainer = _trainer(tiny_target, "eagle", 0.0)
    batch = _batch(tiny_target, _rows(tiny_target))
    snapshots = []
    for epoch, val_tau in enumerate([1.2, 1.5, 1.3]):
        trainer.train_step(batch)
        snapshots.append({k: v.detach().cpu().clone() for k, v in trainer.head_module.state_dict().items()})
        assert trainer.consider_best(val_tau, epoch) == (epoch != 2)
    assert trainer.best_epoch == 1 and trainer.best_val_tau == 1.5
    for name, value in trainer.export_state().items():
        torch.testing.assert_close(value, snapshots[1][name], msg=name)


def _greedy_round_starts(target, head, prompt, *, draft_length, max_new_tokens):
    """Greedy speculative decoding of `prompt`; returns (prompt + output ids, [(pending position, accepted)])."""
    committed: list[int] = []
    decode = DecodeConfig(max_new_tokens=max_new_tokens, draft_length=draft_length, tree="chain")
    result = generate(target, prompt, config=decode, drafter=head, on_tokens=lambda new: committed.append(len(new)))
    # `pending` is the index of the token the target chose but has not scored yet (the prefill's token first); a
    # round drafts after it, so its chain starts at `pending - 1`, and it emits its accepted drafts + a new token.
    rounds, pending = [], prompt.shape[1] + committed[0] - 1
    for emitted in committed[1:]:
        rounds.append((pending - 1, emitted - 1))
        pending += emitted
    return torch.cat([prompt[0], torch.tensor(result.token_ids)]), rounds


@pytest.mark.parametrize("head_type", ["eagle", "medusa"])
def test_validation_chain_acceptance_is_what_greedy_decoding_accepts(tiny_target, head_type):
    """The validation tau estimate is measured the way decoding drafts: for every round of real greedy speculative
    decoding, the number of drafted tokens it accepted equals the leading run of hits `chain_hits` reports for that
    chain start (rounds with the full draft budget), checked as the head goes from untrained to overfitted."""
    draft_length = 3
    trainer = _trainer(tiny_target, head_type, 0.0)
    prompt = torch.tensor([[1, 5, 9, 14, 3, 22]])

    def as_batch(sequence):
        mask = [0] * prompt.shape[1] + [1] * (len(sequence) - prompt.shape[1])
        return _batch(tiny_target, [{"input_ids": sequence.tolist(), "loss_mask": mask}])

    seen = set()
    for _ in range(10):
        head = trainer.head_module.eval()
        sequence, rounds = _greedy_round_starts(tiny_target, head, prompt, draft_length=draft_length, max_new_tokens=60)
        batch = as_batch(sequence)
        with torch.no_grad():
            hits, evaluable = trainer.chain_hits(batch, draft_length)
        for start, accepted in rounds:
            if start + 2 + draft_length >= len(sequence):
                continue  # the last rounds draft fewer tokens (the budget ends)
            run = 0
            while run < draft_length and evaluable[run, 0, start] and hits[run, 0, start]:
                run += 1
            assert run == accepted, (start, run, accepted)
            seen.add(accepted)
        for _ in range(4):
            trainer.train_step(batch)
    assert {0, draft_length} <= seen and len(seen) > 2, seen


@pytest.mark.parametrize("extra_layers", [(), (0, 1)])
def test_validation_tau_is_the_tau_greedy_chain_decoding_reaches(tiny_target, extra_layers):
    """val_tau replays greedy chain decoding on a held-out answer: on the answer the decoder itself produced, it is
    that generation's tau exactly, as the head goes from untrained to overfitted; with fused extra layers too
    (training reads the same layers, normalised the same way, as decoding)."""
    draft_length = 3
    trainer = _trainer(tiny_target, "eagle", 0.0, extra_layers, val_draft_length=draft_length)
    if extra_layers:  # the fusion reads the extra layers from the start, not only the last state
        hidden_size = tiny_target.model.config.hidden_size
        with torch.no_grad():
            trainer.head_module.fuse.weight[:, hidden_size:].normal_(std=0.01)
    prompt = torch.tensor([[1, 5, 9, 14, 3, 22]])
    decode = DecodeConfig(max_new_tokens=50, draft_length=draft_length, tree="chain")  # within _batch's 64
    taus = []
    for _ in range(8):
        result = generate(tiny_target, prompt, config=decode, drafter=trainer.head_module.eval())
        sequence = prompt[0].tolist() + result.token_ids
        mask = [0] * prompt.shape[1] + [1] * len(result.token_ids)
        batch = _batch(tiny_target, [{"input_ids": sequence, "loss_mask": mask}], extra_layers)
        assert trainer.evaluate([batch])["val_tau"] == pytest.approx(result.stats.acceptance_length)
        taus.append(result.stats.acceptance_length)
        for _ in range(4):
            trainer.train_step(batch)
    assert max(taus) > min(taus) + 1, taus


def test_replayed_decoding_counts_rounds_like_the_decoder():
    # The answer is at positions 2-7; a round from chain start 1 accepts 2 drafts, one from chain start 4 all 3.
    leading = [0, 2, 0, 0, 3, 0, 0, 0]
    assert replay_chain_decoding(leading, [0, 0, 1, 1, 1, 1, 1, 1]) == (6, 3)  # prefill, +3, +2 (answer ends)
    assert replay_chain_decoding(leading, [0, 0, 0, 0]) == (0, 0)


def test_replayed_decoding_decodes_each_answer_of_a_multi_turn_row_on_its_own():
    # Two answers of 20 tokens with a 30-token user turn between them; a perfect head accepts 5 drafts per round:
    # each answer is a prefill (1 token) then rounds of 6, so (1 + 6 + 6 + 6 + 1) tokens in 5 passes per answer.
    mask = [0] * 10 + [1] * 20 + [0] * 30 + [1] * 20
    assert replay_chain_decoding([5] * len(mask), mask) == (40, 10)
    assert replay_chain_decoding([5] * 30, mask[:30]) == (20, 5)


def _answers_file(path, *, rows=16, length=40, seed=0, vocab_size=80):
    """A Parquet file shaped like ../shared/data/smollm2_answers (no koala metadata, int64 lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    generator = torch.Generator().manual_seed(seed)
    records = []
    for index in range(rows):
        ids = torch.randint(3, vocab_size, (length - index % 5,), generator=generator).tolist()
        records.append({"prompt_id": f"{index:016x}", "input_ids": ids, "loss_mask": [0] * 10 + [1] * (len(ids) - 10)})
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_koala_train_no_ray_trains_validates_resumes_and_exports(tiny_model_dir, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.heads import load_head
    from pipeline.target import load_target

    data = _answers_file(tmp_path / "answers.parquet")
    out = tmp_path / "run"
    command = ["train", "--no-ray", "--data", str(data), "--out", str(out), "--target", str(tiny_model_dir),
               "--head-type", "eagle", "--epochs", "2", "--set", "val_fraction=0.25", "--set", "batch_size=4",
               "--set", "tracking.enabled=false", "--set", "target.device=cpu", "--set", "head_lr=3e-3"]
    assert main(command) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    steps = summary["metrics"]["step"]
    assert summary["train_rows"] + summary["validation_rows"] == 16 and summary["validation_rows"] > 0
    assert summary["best_epoch"] in (0, 1) and summary["best_val_tau"] >= 1.0
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [int(m["epoch"]) for m in epochs if "val_tau" in m] == [0, 1]
    target = load_target(str(tiny_model_dir), device="cpu")
    assert load_head(out / "head", target.model, target_name=target.name).config.head_type == "eagle"

    capsys.readouterr()
    assert main(command) == 0  # the same command again resumes from the checkpoint: nothing left to train
    assert "resuming from step" in capsys.readouterr().out
    assert json.loads((out / "train_summary.json").read_text())["metrics"]["step"] == steps
    assert main([*command, "--set", "head_lr=1e-3"]) == 2  # another run's checkpoint is refused, not mixed in
    assert main([*command, "--num-workers", "2"]) == 2


def test_the_draft_vocabulary_is_counted_on_the_training_rows_alone(tiny_model_dir, tmp_path):
    """A token only the validation rows hold, however frequent, stays out of the draft vocabulary (it was counted
    from the whole data: the held-out answers shaped the vocabulary their val_tau is measured with)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli import main
    from pipeline.heads import load_head
    from pipeline.stages.train import read_rows, split_rows
    from pipeline.target import load_target

    data = _answers_file(tmp_path / "answers.parquet", vocab_size=40)
    config = TrainConfig(data_dirs=(str(data),), val_fraction=0.25)
    _, validation = split_rows(read_rows([data]), config)
    held_out = {row["prompt_id"] for row in validation}
    assert held_out
    records = pq.read_table(data).to_pylist()
    for record in records:
        if record["prompt_id"] in held_out:
            record["input_ids"][10:] = [79] * (len(record["input_ids"]) - 10)
    pq.write_table(pa.Table.from_pylist(records), data)
    out = tmp_path / "run"
    assert main(["train", "--no-ray", "--data", str(data), "--out", str(out), "--target", str(tiny_model_dir),
                 "--head-type", "eagle", "--max-steps", "1", "--set", "val_fraction=0.25", "--set", "batch_size=4",
                 "--set", "head.draft_vocab_size=8", "--set", "tracking.enabled=false",
                 "--set", "target.device=cpu"]) == 0
    target = load_target(str(tiny_model_dir), device="cpu")
    vocabulary = load_head(out / "head", target.model, target_name=target.name).vocabulary.draft_token_ids
    assert len(vocabulary) == 8 and 79 not in vocabulary.tolist()


def test_a_resumed_local_run_logs_each_step_once(tiny_model_dir, tmp_path, monkeypatch):
    """A run that dies between checkpoints logged steps its resumed run trains and logs again: metrics.jsonl keeps
    each step once (the resumed run's), as an uninterrupted run writes it."""
    import pipeline.stages.train as train_stage
    from pipeline.cli import main

    class Crashed(Exception):
        pass

    def crash_after_step_3(step):
        if step == 3:
            raise Crashed

    data = _answers_file(tmp_path / "answers.parquet")
    out = tmp_path / "run"
    command = ["train", "--no-ray", "--data", str(data), "--out", str(out), "--target", str(tiny_model_dir),
               "--head-type", "medusa", "--max-steps", "5", "--set", "val_fraction=0.25", "--set", "batch_size=4",
               "--set", "log_every_steps=1", "--set", "checkpoint_every_steps=2", "--set", "tracking.enabled=false",
               "--set", "target.device=cpu"]
    with monkeypatch.context() as patch:
        patch.setattr(train_stage, "LoopHooks", lambda **hooks: LoopHooks(**hooks, after_step=crash_after_step_3))
        with pytest.raises(Crashed):
            main(command)  # steps 1-3 logged, the checkpoint holds step 2
    assert main(command) == 0
    steps = [int(json.loads(line)["step"]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_rows_whose_mask_does_not_fit_their_tokens_are_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    """Parquet from elsewhere with a loss_mask longer or shorter than its input_ids fails on reading, naming the file
    and the row, before the target loads (it was a shape RuntimeError from the first batch holding the row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cli import main

    data = _answers_file(tmp_path / "answers.parquet")
    records = pq.read_table(data).to_pylist()
    records[5]["loss_mask"] = records[5]["loss_mask"][:-1]
    pq.write_table(pa.Table.from_pylist(records), data)
    assert main(["train", "--no-ray", "--data", str(data), "--out", str(tmp_path / "run"), "--target",
                 str(tiny_model_dir), "--epochs", "1", "--set", "tracking.enabled=false",
                 "--set", "target.device=cpu"]) == 2
    error = capsys.readouterr().err
    assert "answers.parquet" in error and f"row 5 (prompt_id {records[5]['prompt_id']})" in error
    assert "loss_mask" in error and len(error.strip().splitlines()) == 1


def test_data_of_another_tokenizer_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    """Token ids past the target's vocabulary (data tokenized for another target) fail before training, naming the
    target (an IndexError from the embedding before, a device-side assert on CUDA)."""
    from pipeline.cli import main

    data = _answers_file(tmp_path / "answers.parquet", vocab_size=100)  # the tiny target has 80 tokens
    assert main(["train", "--no-ray", "--data", str(data), "--out", str(tmp_path / "run"), "--target",
                 str(tiny_model_dir), "--epochs", "1", "--set", "tracking.enabled=false",
                 "--set", "target.device=cpu"]) == 2
    error = capsys.readouterr().err
    assert "past the vocabulary of train.target" in error and "80 tokens" in error
    assert len(error.strip().splitlines()) == 1

    from pipeline.stages.train import check_data_target

    rows = [{"input_ids": [5, 79], "loss_mask": [0, 1]}]
    check_data_target({"target": {"name": "tiny", "vocab_size": 80}}, rows, vocab_size=80, target="tiny")
    with pytest.raises(ConfigError, match="distilled from 'smollm2' \\(49152 tokens\\), but train.target 'tiny' has 80"):
        check_data_target({"target": {"name": "smollm2", "vocab_size": 49152}}, rows, vocab_size=80, target="tiny")


def test_data_budget_is_deterministic_and_nested():
    from pipeline.stages.train import within_budget

    rows = [{"prompt_id": str(i), "input_ids": [0] * 10, "loss_mask": [1] * 10} for i in range(50)]
    small = within_budget(rows, 100, seed=0)
    large = within_budget(rows, 300, seed=0)
    assert len(small) == 10 and len(large) == 30
    assert within_budget(rows, 100, seed=0) == small
    assert {r["prompt_id"] for r in small} <= {r["prompt_id"] for r in large}
    assert within_budget(rows, 0, seed=0) == rows


def test_training_time_test_trains_every_unrolled_step(tiny_target):
    """With unroll_depth 3 the loss covers draft steps 1-3, and deeper drafted tokens become right too."""
    batch = _batch(tiny_target, _rows(tiny_target))
    trainer = _trainer(tiny_target, "eagle", 0.0, unroll_depth=3, val_draft_length=3)
    steps_in_loss = trainer.predict(batch).weights.unique().tolist()
    assert sorted(steps_in_loss) == pytest.approx(sorted([1.0, 0.8, 0.64]))
    before = trainer.evaluate([batch])
    for _ in range(60):
        trainer.train_step(batch)
    after = trainer.evaluate([batch])
    assert after["val_tau"] > before["val_tau"] + 0.5
    assert after["val_acc_3"] is not None and after["val_acc_3"] > 0.5


def test_fused_head_starts_as_the_plain_head_and_learns_to_read_the_extra_layers(tiny_target):
    """EAGLE-3 style fusion: a fresh fused head computes what the plain head with the same weights does, so it can
    start from a trained plain head; training then moves the weights that read the extra layers."""
    rows = _rows(tiny_target)
    plain_batch, fused_batch = _batch(tiny_target, rows), _batch(tiny_target, rows, (0, 1))
    hidden_size = tiny_target.model.config.hidden_size
    assert fused_batch.features.shape[-1] == 3 * hidden_size
    torch.testing.assert_close(fused_batch.features[..., :hidden_size], plain_batch.features)
    extra = fused_batch.features[..., hidden_size:].unflatten(-1, (2, hidden_size))
    torch.testing.assert_close(extra.pow(2).mean(-1), torch.ones(extra.shape[:-1]), atol=1e-2, rtol=0)  # RMS 1

    plain, fused = _trainer(tiny_target, "eagle", 0.0), _trainer(tiny_target, "eagle", 0.0, (0, 1))
    with torch.no_grad():
        for (name, value), (fused_name, fused_value) in zip(plain.head_module.state_dict().items(),
                                                            fused.head_module.state_dict().items()):
            assert name == fused_name
            fused_value.copy_(value)
        ids = plain_batch.input_ids
        torch.testing.assert_close(fused.head_module(fused_batch.features[:, :-1], ids[:, 1:]),
                                   plain.head_module(plain_batch.features[:, :-1], ids[:, 1:]))
    first = fused.train_step(fused_batch)
    for _ in range(30):
        last = fused.train_step(fused_batch)
    assert last["loss_distill"] < first["loss_distill"]
    assert fused.head_module.fuse.weight[:, hidden_size:].abs().max() > 1e-3


def test_koala_train_no_ray_fuses_extra_layers_starting_from_a_plain_head(tiny_model_dir, tmp_path):
    """`--extra-feature-layers` with `init_head` of a plain head: the cached features carry the extra layers, and the
    exported head reads them (the fusion moved off its pass-through start)."""
    from pipeline.cli import main
    from pipeline.heads import build_head, load_head, save_head, target_identity_dict
    from pipeline.target import load_target

    target = load_target(str(tiny_model_dir), device="cpu")
    plain = build_head(HeadConfig(head_type="eagle"), target.model)
    save_head(plain, tmp_path / "plain", target_identity=target_identity_dict(target.model, target.name))
    data = _answers_file(tmp_path / "answers.parquet")
    out = tmp_path / "run"
    assert main(["train", "--no-ray", "--data", str(data), "--out", str(out), "--target", str(tiny_model_dir),
                 "--head-type", "eagle", "--extra-feature-layers", "0", "1", "--epochs", "1",
                 "--set", f"init_head={tmp_path / 'plain'}", "--set", "val_fraction=0.25", "--set", "batch_size=4",
                 "--set", "tracking.enabled=false", "--set", "target.device=cpu", "--set", "head_lr=3e-3"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["feature_cache"].startswith("estimate")
    head = load_head(out / "head", target.model, target_name=target.name)
    assert head.config.extra_feature_layers == (0, 1)
    hidden_size = target.model.config.hidden_size
    assert head.fuse.weight.shape == (hidden_size, 3 * hidden_size)
    assert head.fuse.weight[:, hidden_size:].abs().max() > 0
    torch.testing.assert_close(head.fc.weight, plain.fc.weight.to(head.fc.weight.dtype), atol=0.2, rtol=0)


def test_validation_computes_the_targets_greedy_tokens_once(tiny_target, monkeypatch):
    """The full-vocabulary argmax over the validation rows is the same every epoch: computed on the first
    validation only, and the metrics equal an uncached evaluation's."""
    from pipeline.stages.train import _validation
    from pipeline.training import FeatureStore

    rows = _rows(tiny_target, count=6)
    trainer = _trainer(tiny_target, "eagle", 0.0, batch_size=4)
    store = FeatureStore.build(tiny_target.model, rows, max_seq_len=64, progress=False)
    calls = []
    original = trainer.target_greedy
    monkeypatch.setattr(trainer, "target_greedy", lambda features: calls.append(1) or original(features))
    validate = _validation(trainer, rows, store, trainer.config)
    first = validate()
    assert len(calls) == 2  # two batches of at most 4 rows
    assert validate() == first and len(calls) == 2
    uncached = trainer.evaluate([store.batch(rows, [0, 1, 2, 3], dtype=torch.float32),
                                 store.batch(rows, [4, 5], dtype=torch.float32)])
    assert first == {k: v for k, v in uncached.items() if v is not None}


def test_a_saved_feature_cache_is_used_only_for_the_rows_it_was_computed_for(tiny_target, tmp_path):
    """A Ray worker may hold other rows after a restart: a cache computed for other rows is computed again, never
    read against the wrong rows."""
    from pipeline.stages.train import _features

    config = TrainConfig(data_dirs=("unused",), head=HeadConfig(head_type="eagle"), max_seq_len=64)
    rows, others = _rows(tiny_target, count=4), _rows(tiny_target, count=4, seed=1)
    path = tmp_path / "train-rank0-of2.safetensors"
    saved = _features(tiny_target.model, rows, config, cache=True, progress=False, cache_path=path)
    again = _features(tiny_target.model, rows, config, cache=True, progress=False, cache_path=path)
    torch.testing.assert_close(again.flat, saved.flat)
    reordered = _features(tiny_target.model, rows[::-1], config, cache=True, progress=False, cache_path=path)
    swapped = _features(tiny_target.model, others, config, cache=True, progress=False, cache_path=path)
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path)  # a cache written before caches carried their rows' fingerprint
    unmarked = _features(tiny_target.model, others, config, cache=True, progress=False, cache_path=path)
    for store, expected_rows in ((reordered, rows[::-1]), (swapped, others), (unmarked, others)):
        for index, row in enumerate(expected_rows):
            cached = store.batch(expected_rows, [index], dtype=torch.float32).features
            fresh = _batch(tiny_target, [row]).features
            torch.testing.assert_close(cached, fresh, atol=2e-3, rtol=2e-3)  # the cache is fp16


def test_koala_head_tree_measures_a_larger_static_tree_on_held_out_rows(tiny_model_dir, tmp_path, capsys):
    """A head's static tree measured again at another size (a GPU verifies ~60 tokens in the time of one): only the
    tree in its settings changes, decoding with it stays lossless, and bad inputs are one-line errors."""
    from pipeline.cli import main
    from pipeline.config import DecodeConfig
    from pipeline.decoding import generate
    from pipeline.heads import build_head, load_head, save_head, target_identity_dict
    from pipeline.stages.train import is_validation, read_rows
    from pipeline.target import load_target
    from pipeline.trees import check_static_tree

    target = load_target(str(tiny_model_dir), device="cpu")
    data = _answers_file(tmp_path / "answers.parquet", rows=24)
    # A head that has learnt something (a fresh one is never right past depth 1, so no deeper path would qualify).
    assert main(["train", "--no-ray", "--data", str(data), "--out", str(tmp_path / "run"), "--target",
                 str(tiny_model_dir), "--head-type", "eagle", "--epochs", "3", "--set",
                 "val_fraction=0.5", "--set", "batch_size=4", "--set", "tracking.enabled=false", "--set",
                 "target.device=cpu", "--set", "head_lr=3e-3"]) == 0
    head_dir = tmp_path / "head"
    shutil.copytree(tmp_path / "run" / "head", head_dir)
    (head_dir / "README.md").write_text("model card")
    capsys.readouterr()
    common = ["--data", str(data), "--target", str(tiny_model_dir), "--device", "cpu", "--val-fraction", "0.5"]
    assert main(["head", "tree", "--head", str(head_dir), "--nodes", "10", "--out", str(tmp_path / "t10"), *common]) == 0
    assert "head tree: 10 paths" in capsys.readouterr().out
    measured = json.loads((tmp_path / "t10" / "head_config.json").read_text())
    before = json.loads((head_dir / "head_config.json").read_text())
    assert {k: v for k, v in measured["head"].items() if k != "static_tree"} == {
        k: v for k, v in before["head"].items() if k != "static_tree"} and measured["target"] == before["target"]
    tree = [tuple(path) for path in measured["head"]["static_tree"]]
    assert len(tree) == len(set(tree)) == 10 and max(map(len, tree)) <= 6
    check_static_tree(tree)
    assert (tmp_path / "t10" / "head.safetensors").read_bytes() == (head_dir / "head.safetensors").read_bytes()
    assert (tmp_path / "t10" / "README.md").read_text() == "model card"

    head = load_head(tmp_path / "t10", target.model, target_name=target.name)
    prompt = torch.tensor([[1, 5, 9, 14, 3, 22]])
    config = DecodeConfig(max_new_tokens=30, tree="static", tree_nodes=10, draft_length=3)
    assert generate(target, prompt, config=config, drafter=head).token_ids == generate(
        target, prompt, config=config).token_ids

    assert main(["head", "tree", "--head", str(head_dir), "--nodes", "4", *common]) == 0  # in place
    assert len(json.loads((head_dir / "head_config.json").read_text())["head"]["static_tree"]) == 4
    assert (head_dir / "README.md").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["head", "tree", "--head", str(head_dir), "--nodes", "0", *common]) == 2
    assert main(["head", "tree", "--head", str(head_dir), *common[:-2], "--val-fraction", "1e-9"]) == 2
    assert main(["head", "tree", "--head", str(head_dir), "--nodes", "4", *common, "--max-rows", "-1"]) == 2
    errors = capsys.readouterr().err
    assert "at least one node" in errors and "validation split" in errors and "--max-rows must be >= 1" in errors

    # A head in its training run's directory: its held-out split is the default, a larger one (rows it trained on,
    # measured as held out before) is refused.
    in_run = ["--data", str(data), "--target", str(tiny_model_dir), "--device", "cpu", "--nodes", "4"]
    assert main(["head", "tree", "--head", str(tmp_path / "run" / "head"), *in_run, "--out", str(tmp_path / "r")]) == 0
    assert f"from {sum(is_validation(r['split_id'], 0.5) for r in read_rows([data]))} held-out rows" in (
        capsys.readouterr().out)
    assert main(["head", "tree", "--head", str(tmp_path / "run" / "head"), *in_run, "--val-fraction", "0.6"]) == 2
    error = capsys.readouterr().err
    assert "--val-fraction 0.6 takes rows the head trained on" in error and "held out 0.5" in error
