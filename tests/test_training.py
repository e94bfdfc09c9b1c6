"""The KOALA trainer without Ray: heads overfit a batch, resume equals an uninterrupted run, validation is sane."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_target
from pipeline.config import HeadConfig, TrainConfig
from pipeline.heads import build_head
from pipeline.training import KoalaTrainer, TrainBatch, iterate_batches, pad_rows, target_features


def _rows(target, count=4, length=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        ids = torch.randint(3, target.model.config.vocab_size, (length - index,), generator=generator).tolist()
        half = len(ids) // 2
        rows.append({"prompt_id": f"p{index}", "input_ids": ids, "loss_mask": [0] * half + [1] * (len(ids) - half)})
    return rows


def _batch(target, rows):
    input_ids, loss_mask = pad_rows(rows, max_seq_len=64)
    return TrainBatch(input_ids, loss_mask, target_features(target.model, input_ids, loss_mask))


def _trainer(target, head_type, adv_weight, **overrides):
    torch.manual_seed(0)
    head_config = HeadConfig(head_type=head_type, num_layers=2, num_heads=3)
    config = TrainConfig(data_dirs=("unused",), head=head_config, adv_weight=adv_weight, head_lr=3e-3,
                         discriminator_hidden_size=32, **overrides)
    head = build_head(head_config, target.model).requires_grad_(True)
    return KoalaTrainer(config, head=head, target_model=target.model)


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
    batches = [_batch(tiny_target, _rows(tiny_target, seed=s)) for s in range(4)]
    uninterrupted = _trainer(tiny_target, head_type, 0.1)
    for batch in batches:
        uninterrupted.train_step(batch)

    first_half = _trainer(tiny_target, head_type, 0.1)
    for batch in batches[:2]:
        first_half.train_step(batch)
    first_half.save_state(tmp_path)
    resumed = _trainer(tiny_target, head_type, 0.1)
    resumed.load_state(tmp_path)
    assert resumed.step == 2
    for batch in batches[2:]:
        resumed.train_step(batch)
    for (name, expected), actual in zip(uninterrupted.head_module.state_dict().items(),
                                        resumed.head_module.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)


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
