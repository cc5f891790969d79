"""Packing several samples into fixed-length rows: every sample kept whole and once, attention confined
to its own sample, and a packed batch giving each sample exactly the logits, loss and gradients it gets
unpacked."""

import dataclasses

import numpy as np
import pytest
import torch

from sysopt.data import DigitsTaskConfig
from sysopt.data.batching import BatchSampler, collate, pack_rows, sample_lengths
from sysopt.data.digits import DigitsDataset
from sysopt.models import VLM, VLMConfig, vlm_loss
from sysopt.models.decoder import packed_causal_mask

PACK = 32
CONFIG = DigitsTaskConfig(n_train=3000, pack_len=PACK, shift_px=0.0, rotate_deg=0.0)


@pytest.fixture(scope="module")
def dataset():
    return DigitsDataset(CONFIG, "train")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VLM(VLMConfig(max_seq=PACK))


def segments_of(sampler, step):
    """[(row, start, length, dataset index)] for every sample of the packed batch of `step`."""
    out = []
    for r, row in enumerate(sampler.rows(step)):
        at = 0
        for index in row:
            n = int(sample_lengths(sampler.dataset, [index])[0])
            out.append((r, at, n, index))
            at += n
    return out


@pytest.mark.parametrize("open_rows", [1, 3, 8])
def test_pack_rows_keeps_every_item_once_in_order_within_capacity(open_rows):
    lengths = np.random.default_rng(open_rows).integers(1, 12, size=500)
    rows = pack_rows(lengths, 20, open_rows)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(row == sorted(row) for row in rows)
    assert all(sum(lengths[i] for i in row) <= 20 for row in rows)
    # no item could have gone into an earlier row that was still open with room: first fit
    if open_rows == 1:  # next fit: a row closes only when the next item does not fit
        for a, b in zip(rows, rows[1:]):
            assert sum(lengths[i] for i in a) + lengths[b[0]] > 20


def test_first_fit_packs_tighter_than_next_fit():
    lengths = np.random.default_rng(0).integers(4, 12, size=2000)
    fill = lambda rows: lengths.sum() / (len(rows) * 32)  # noqa: E731
    assert fill(pack_rows(lengths, 32, 8)) > fill(pack_rows(lengths, 32, 1))


def test_too_long_sample_and_bad_pack_len_are_clear_errors():
    with pytest.raises(ValueError, match="length 12 does not fit pack_len=10; raise pack_len to at least 12"):
        pack_rows(np.array([3, 12]), 10)
    with pytest.raises(ValueError, match="pack_len=5 is shorter than the longest sample"):
        DigitsTaskConfig(pack_len=5)


def test_packed_batch_lays_out_each_sample_as_unpacked(dataset):
    sampler = BatchSampler(dataset, 8)
    packed = sampler.global_batch(3)
    flat = sampler.indices(3)
    plain = collate(dataset, flat)
    assert packed.tokens.shape == (8, PACK)
    assert len(flat) > 8  # several samples per row
    for k, (r, at, n, index) in enumerate(segments_of(sampler, 3)):
        assert plain.task_ids[k] == dataset.task_ids[index]
        assert torch.equal(packed.tokens[r, at : at + n], plain.tokens[k, :n])
        assert torch.equal(packed.targets[r, at : at + n], plain.targets[k, :n])
        assert torch.equal(packed.loss_mask[r, at : at + n], plain.loss_mask[k, :n])
        assert packed.targets[r, at + n - 1] == dataset.tokenizer.eos_id  # never the next sample's token
        assert torch.equal(packed.position_ids[r, at : at + n], torch.arange(n))
        assert len(set(packed.segment_ids[r, at : at + n].tolist())) == 1
    # images in reading order; every image slot points at its own image; owners are rows
    assert torch.equal(packed.images, plain.images)
    slots = packed.image_slots[packed.image_slots >= 0]
    assert torch.equal(slots, torch.arange(len(slots)))
    rows_with_images = packed.image_slots.ge(0).nonzero()[:, 0]
    assert torch.equal(packed.image_owner, rows_with_images)
    assert packed.loss_mask.sum() == plain.loss_mask.sum()
    assert (packed.segment_ids[packed.segment_ids < 0] == -1).all()


def test_sampler_packs_each_sample_at_most_once_per_epoch(dataset):
    sampler = BatchSampler(dataset, 16)
    seen = np.concatenate([sampler.indices(s) for s in range(sampler.batches_per_epoch)])
    assert len(seen) == len(set(seen.tolist()))
    assert len(seen) > 16 * sampler.batches_per_epoch * 2  # at least two samples per row on average
    again = BatchSampler(dataset, 16)
    assert torch.equal(again.global_batch(5).tokens, sampler.global_batch(5).tokens)
    assert not np.array_equal(sampler.indices(0), sampler.indices(sampler.batches_per_epoch))  # reshuffled


def test_mask_is_causal_and_block_diagonal():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = packed_causal_mask(type("B", (), {"segment_ids": segments})())[0, 0]
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expect)
    assert packed_causal_mask(type("B", (), {"segment_ids": None})()) is None


def test_packed_logits_loss_and_gradients_equal_unpacked(dataset, model):
    sampler = BatchSampler(dataset, 8)
    packed, plain = sampler.global_batch(1), collate(dataset, sampler.indices(1))
    logits_packed, logits_plain = model(packed), model(plain)
    for k, (r, at, n, _) in enumerate(segments_of(sampler, 1)):
        torch.testing.assert_close(logits_packed[r, at : at + n], logits_plain[k, :n], rtol=1e-5, atol=1e-5)

    def grads(batch):
        model.zero_grad()
        loss = vlm_loss(model(batch), batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_packed, grads_packed = grads(packed)
    loss_plain, grads_plain = grads(plain)
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_packed, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_attention_across_packed_samples(dataset, model):
    sampler = BatchSampler(dataset, 4)
    batch = sampler.global_batch(0)
    segs = [s for s in segments_of(sampler, 0) if s[0] == 0]
    assert len(segs) >= 2
    _, at, n, _ = segs[0]
    # rewrite the first sample's text tokens and every image: later samples in the row must not notice
    tokens = batch.tokens.clone()
    text = batch.image_slots[0, at : at + n] < 0
    tokens[0, at : at + n][text] = (tokens[0, at : at + n][text] + 1) % model.config.vocab_size
    images = batch.images.clone()
    first_images = int((~text).sum())  # the row's first sample shows the batch's first images
    images[:first_images] = torch.randn_like(images[:first_images])
    changed = dataclasses.replace(batch, tokens=tokens, images=images)
    first_end = at + n
    before, after = model(batch), model(changed)
    rest = slice(first_end, first_end + sum(s[2] for s in segs[1:]))
    torch.testing.assert_close(after[0, rest], before[0, rest])
    assert not torch.allclose(after[0, at:first_end], before[0, at:first_end])
    # the same row without segment ids (one causal sequence) does leak: the mask is what isolates
    leaky = dataclasses.replace(changed, segment_ids=None, position_ids=None)
    plain = dataclasses.replace(batch, segment_ids=None, position_ids=None)
    assert not torch.allclose(model(leaky)[0, rest], model(plain)[0, rest])


def test_packed_batches_stay_full_across_epochs_of_different_row_counts():
    """Each epoch is re-shuffled and re-packed into a different number of rows (here 79 to 81). Every batch
    must still hold exactly batch_size rows (a short one used to fail dp sharding at an epoch's end, step
    159 here), every packed row of every epoch must be trained on in order, and a step's batch must not
    depend on which steps were drawn before (a resumed run asks for its first step directly)."""
    ds = DigitsDataset(DigitsTaskConfig(n_train=307, pack_len=31), "train")
    sampler = BatchSampler(ds, 2)
    epochs = [sampler._rows(e) for e in range(12)]
    assert len({len(rows) for rows in epochs}) > 1  # epochs pack into different row counts
    steps = sum(len(rows) for rows in epochs) // 2
    drawn = [sampler.rows(k) for k in range(steps)]
    assert {len(rows) for rows in drawn} == {2}
    assert [row for rows in drawn for row in rows] == [row for rows in epochs for row in rows][: 2 * steps]
    assert sampler.global_batch(159).shard(1, 2).size == 1
    for step in (159, 250, steps - 1):
        fresh = BatchSampler(ds, 2)
        assert fresh.rows(step) == drawn[step]
        assert torch.equal(fresh.global_batch(step).tokens, sampler.global_batch(step).tokens)


def test_expected_packing_matches_the_samplers_rows(dataset):
    """What a cost model is told about packed rows (samples and images per row, from the sample mix alone)
    is what the sampler's first-fit packing produces on the data set."""
    from sysopt.data.batching import expected_packing
    from sysopt.data.digits import sample_mix

    mix = sample_mix(CONFIG)
    assert sum(p for p, _, _ in mix) == pytest.approx(1.0)
    lengths = sample_lengths(dataset, np.arange(len(dataset)))
    assert sum(p * n for p, n, _ in mix) == pytest.approx(lengths.mean(), rel=0.02)
    assert {n for _, n, _ in mix} == set(lengths.tolist())
    samples, images = expected_packing(CONFIG)
    rows = BatchSampler(dataset, 16)._rows(0)[:-8]  # the epoch's rows, those still open at its end left out
    assert samples == pytest.approx(np.mean([len(row) for row in rows]), rel=0.03)
    assert images == pytest.approx(np.mean([dataset.n_images[row].sum() for row in rows]), rel=0.03)
    assert samples > 3  # 32-token rows hold several ~7-token samples
