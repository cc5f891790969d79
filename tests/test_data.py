"""Digit-task data: determinism, held-out images, answers that need the images, batching and sharding."""

import dataclasses

import numpy as np
import pytest
import torch

from sysopt.data import (
    TASKS,
    BatchSampler,
    DigitsDataset,
    DigitsTaskConfig,
    Tokenizer,
    collate,
    eval_batches,
    evaluate,
    load_digit_images,
    split_images,
)
from sysopt.data.augment import random_affine

SMALL = DigitsTaskConfig(n_train=4000, n_eval_per_task=100)
PLAIN = dataclasses.replace(SMALL, shift_px=0.0, rotate_deg=0.0)  # no augmentation


@pytest.fixture(scope="module")
def train():
    return DigitsDataset(SMALL, "train")


@pytest.fixture(scope="module")
def held_out():
    return DigitsDataset(SMALL, "eval")


def _assert_batches_equal(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert (x is None and y is None) if x is None or y is None else torch.equal(x, y), field.name


def test_images_match_sklearn_load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = load_digit_images()
    assert torch.equal(images * 16.0, torch.tensor(digits.images, dtype=torch.float32))
    assert np.array_equal(labels, digits.target)


def test_same_seed_same_samples_and_batches(train):
    again = DigitsDataset(SMALL, "train")
    for name in ("task_ids", "n_images", "image_rows", "answers"):
        assert np.array_equal(getattr(train, name), getattr(again, name)), name
    assert [train[i] for i in range(50)] == [again[i] for i in range(50)]
    for step in (0, 7, 200):  # step 200 is in the second epoch of 4000 / 32 = 125 batches
        _assert_batches_equal(
            BatchSampler(train, 32).global_batch(step), BatchSampler(again, 32).global_batch(step)
        )


def test_other_seed_other_samples(train, held_out):
    other = DigitsDataset(dataclasses.replace(SMALL, seed=1), "train")
    assert not np.array_equal(train.image_rows, other.image_rows)
    assert np.array_equal(split_images(SMALL)[1], split_images(other.config)[1])  # the split stays,
    other_eval = DigitsDataset(other.config, "eval")  # and so do the eval questions
    assert [held_out[i] for i in range(len(held_out))] == [other_eval[i] for i in range(len(other_eval))]
    assert not np.array_equal(
        split_images(SMALL)[1], split_images(dataclasses.replace(SMALL, split_seed=1))[1]
    )


def test_splits_are_disjoint_cover_all_images_and_are_stratified(train, held_out):
    train_rows, eval_rows = split_images(SMALL)
    assert not set(train_rows) & set(eval_rows)
    assert len(train_rows) + len(eval_rows) == 1797
    _, labels = load_digit_images()
    for digit in range(10):
        share = np.mean(labels[eval_rows] == digit) / np.mean(labels == digit)
        assert share == pytest.approx(1.0, abs=0.05)
    # every image a split shows (as sequences and as batch pixels) is one of its own images
    used_train = {r for i in range(len(train)) for r in train[i].image_ids}
    used_eval = {r for i in range(len(held_out)) for r in held_out[i].image_ids}
    assert used_train <= set(train_rows) and used_eval <= set(eval_rows)
    pixels_eval = {tuple(held_out.images[r].flatten().tolist()) for r in eval_rows}
    for batch in eval_batches(held_out, 128):
        assert all(tuple(img.flatten().tolist()) in pixels_eval for img in batch.images)


def test_text_and_answers_follow_from_image_labels(train, held_out):
    """Rebuild each sample's text and answer from sklearn's labels (independent of the dataset code)."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    tok = Tokenizer()
    seen = set()
    for data in (train, held_out):
        for i in range(0, len(data), 7):
            s = data[i]
            digits = [int(labels[r]) for r in s.image_ids]
            image = " ".join(["<image>"] * SMALL.tokens_per_image)
            if s.task == "caption":
                text, answer = f"<bos> {image} shows {digits[0]} . <eos>", digits[0]
            elif s.task == "sum":
                text, answer = f"<bos> {image} plus {image} is {digits[0] + digits[1]} . <eos>", sum(digits)
            else:
                assert SMALL.min_relation_images <= len(digits) <= SMALL.max_relation_images
                images = " ".join([image] * len(digits))
                text, answer = f"<bos> {images} : the largest is {max(digits)} . <eos>", max(digits)
            assert s.answer == answer
            assert list(s.token_ids) == tok.encode(text)
            assert tok.decode(s.token_ids[p] for p in s.answer_positions).replace(" ", "") == str(answer)
            seen.add((s.task, len(digits)))
    assert seen == {("caption", 1), ("sum", 2), ("largest", 2), ("largest", 3), ("largest", 4)}


NOISY = dataclasses.replace(SMALL, n_train=60_000, label_noise=0.3)


@pytest.fixture(scope="module")
def noisy():
    return DigitsDataset(NOISY, "train")


def test_label_noise_redraws_training_answers_only(train, held_out, noisy):
    """Noise changes the answers of about p * (1 - 1/K) of the training sequences per task and nothing
    else: images, tasks and clean answers are the noiseless dataset's, the tokens say the noisy answer,
    and the eval split is untouched."""
    plain = DigitsDataset(dataclasses.replace(NOISY, label_noise=0.0), "train")
    assert np.array_equal(noisy.image_rows, plain.image_rows) and np.array_equal(
        noisy.task_ids, plain.task_ids
    )
    assert np.array_equal(noisy.clean_answers, plain.answers)
    for t, k in enumerate((10, 19, 10)):
        rows = noisy.task_ids == t
        changed = float((noisy.answers[rows] != noisy.clean_answers[rows]).mean())
        expected = NOISY.label_noise * (1 - 1 / k)
        assert abs(changed - expected) < 4 * (expected * (1 - expected) / rows.sum()) ** 0.5, TASKS[t]
        assert noisy.answers[rows].min() == 0 and noisy.answers[rows].max() == k - 1
    tok = Tokenizer()
    for i in range(0, len(noisy), 997):
        s = noisy[i]
        assert tok.decode(s.token_ids[p] for p in s.answer_positions).replace(" ", "") == str(s.answer)
    eval_noisy = DigitsDataset(dataclasses.replace(SMALL, label_noise=0.3), "eval")
    assert np.array_equal(eval_noisy.answers, held_out.answers)
    assert train.label_noise_floor() == 0.0 and eval_noisy.label_noise_floor() == 0.0


def test_label_noise_floor_is_the_plug_in_cross_entropy_of_the_noisy_answers(noisy):
    """The closed-form floor against a count: predict each answer digit from the sequences with the same
    task, clean answer and earlier digits (and at least as many digits), then score the data's own noisy
    answers with those frequencies. 60,000 sequences put the count well within 0.5% of the limit, while
    charging the whole answer's entropy (the stop after one digit included) would be 2% off."""
    counts: dict[tuple, int] = {}
    answers = [str(a) for a in noisy.answers]
    keys = list(zip(noisy.task_ids.tolist(), noisy.clean_answers.tolist()))
    for key, a in zip(keys, answers):
        for j in range(len(a)):
            counts[(key, a[:j], "reach")] = counts.get((key, a[:j], "reach"), 0) + 1
            counts[(key, a[: j + 1], "hit")] = counts.get((key, a[: j + 1], "hit"), 0) + 1
    loss = sum(
        -np.log(counts[(key, a[: j + 1], "hit")] / counts[(key, a[:j], "reach")])
        for key, a in zip(keys, answers)
        for j in range(len(a))
    )
    plug_in = loss / sum(len(a) for a in answers)
    floor = noisy.label_noise_floor()
    assert floor == pytest.approx(plug_in, rel=0.005)
    # the sum task's two-digit answers make it lower than the single-token entropy of its noise
    q = 1 - NOISY.label_noise + NOISY.label_noise / 10
    single = -q * np.log(q) - 9 * (1 - q) / 9 * np.log((1 - q) / 9)
    assert 0.5 * single < floor < single


def test_answers_never_appear_in_the_text_before_them(train, held_out):
    """No digit token precedes the first answer token, so only the images can tell the answer."""
    digit_ids = torch.tensor(Tokenizer().encode("0 1 2 3 4 5 6 7 8 9"))
    for data in (train, held_out):
        for batch in eval_batches(data, 512):
            first_answer = batch.loss_mask.argmax(dim=1)  # input position predicting the first answer token
            for b in range(batch.size):
                prompt = batch.tokens[b, : first_answer[b] + 1]
                assert not torch.isin(prompt, digit_ids).any()
            assert torch.isin(batch.targets[batch.loss_mask > 0], digit_ids).all()


def test_loss_mask_marks_exactly_the_answer_tokens(train):
    batch = BatchSampler(train, 64).global_batch(3)
    idx = BatchSampler(train, 64).indices(3)
    for b, i in enumerate(idx):
        s = train[int(i)]
        marked = torch.nonzero(batch.loss_mask[b]).flatten() + 1  # target t is token t + 1
        assert marked.tolist() == list(s.answer_positions)
        padded = list(s.token_ids) + [0] * (train.config.seq_len + 1 - len(s.token_ids))
        assert batch.tokens[b].tolist() == padded[:-1] and batch.targets[b].tolist() == padded[1:]


@pytest.mark.parametrize("k", [1, 4])
def test_image_slots_point_at_each_samples_own_images(k):
    data = DigitsDataset(dataclasses.replace(PLAIN, tokens_per_image=k), "train")
    sampler = BatchSampler(data, 48)
    batch = sampler.global_batch(5)
    assert batch.tokens.shape == (48, data.config.seq_len)
    for b, i in enumerate(sampler.indices(5)):
        s = data[int(i)]
        slots = batch.image_slots[b][batch.image_slots[b] >= 0]
        assert len(slots) == k * len(s.image_ids)
        assert torch.equal(batch.tokens[b][batch.image_slots[b] >= 0], torch.full((len(slots),), 1))
        expected = data.images[torch.tensor(s.image_ids)].repeat_interleave(k, dim=0)
        assert torch.equal(batch.images[slots // k], expected)
        assert torch.equal(slots % k, torch.arange(k).repeat(len(s.image_ids)))


@pytest.mark.parametrize("world", [2, 4])
def test_shard_equals_collating_that_slice(world):
    data = DigitsDataset(PLAIN, "train")
    sampler = BatchSampler(data, 64)
    global_batch, idx = sampler.global_batch(11), sampler.indices(11)
    rows = 64 // world
    for rank in range(world):
        _assert_batches_equal(
            global_batch.shard(rank, world), collate(data, idx[rank * rows : (rank + 1) * rows])
        )
    with pytest.raises(ValueError, match="not divisible by world=3"):
        global_batch.shard(0, 3)


def test_shards_of_an_augmented_batch_keep_its_images(train):
    """Every rank cuts the same augmented global batch: shard images are the owner's rows of it."""
    global_batch = BatchSampler(train, 64).global_batch(4)
    pieces = [global_batch.shard(rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat([p.images for p in pieces]), global_batch.images)
    assert torch.equal(
        torch.cat([p.image_owner + 16 * r for r, p in enumerate(pieces)]), global_batch.image_owner
    )


def test_augmentation_warps_training_images_only_and_per_step(train, held_out):
    plain = DigitsDataset(PLAIN, "train")
    a, b = BatchSampler(train, 64).global_batch(4), BatchSampler(plain, 64).global_batch(4)
    assert torch.equal(a.tokens, b.tokens) and not torch.allclose(a.images, b.images)
    assert torch.equal(a.images, BatchSampler(train, 64).global_batch(4).images)
    # eval batches are never warped, whichever way they are drawn
    in_order = BatchSampler(held_out, 64, shuffle=False).global_batch(0)
    assert torch.equal(in_order.images, collate(held_out, np.arange(64)).images)
    assert torch.equal(in_order.images, eval_batches(held_out, 64)[0].images)


def test_random_affine_matches_exact_pixel_shifts_and_identity():
    images, _ = load_digit_images()
    x = images[:20]
    assert torch.allclose(random_affine(x, np.random.default_rng(0), 0.0, 0.0, 0.0), x, atol=1e-6)

    class OneRight:  # draws shift +1 (x), 0 (y), no rotation or zoom
        def uniform(self, low, high, size):
            out = np.zeros(size)
            out[0, :, 0] = 1.0
            return out

    # the grid reads input column x + 1 for output column x: content moves one pixel left, zeros enter
    shifted = random_affine(x, OneRight(), 1.0, 0.0, 0.0)
    expected = torch.cat([x[:, :, 1:], torch.zeros(20, 8, 1)], dim=2)
    assert torch.allclose(shifted, expected, atol=1e-6)


def test_shuffled_images_keep_text_and_pixels_but_move_them(held_out):
    plain = eval_batches(held_out, 100)
    shuffled = eval_batches(held_out, 100, shuffle_images=True)
    moved = 0
    for a, b in zip(plain, shuffled):
        for name in ("tokens", "targets", "image_slots", "image_owner", "loss_mask", "task_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert torch.equal(a.images.flatten(1).sort(dim=0).values, b.images.flatten(1).sort(dim=0).values)
        moved += int((a.images != b.images).flatten(1).any(1).sum())
    assert moved > 0.8 * sum(a.images.shape[0] for a in plain)


def test_the_shuffled_image_control_on_eval_depends_on_split_seed_only(held_out):
    # eval data depends on split_seed only, so runs with other training seeds score the same questions:
    # the shuffled-image control must too (it used to draw its permutation from the training seed)
    other_seed = DigitsDataset(dataclasses.replace(SMALL, seed=SMALL.seed + 1), "eval")
    for a, b in zip(
        eval_batches(held_out, 100, shuffle_images=True), eval_batches(other_seed, 100, shuffle_images=True)
    ):
        _assert_batches_equal(a, b)


def test_eval_split_has_fixed_counts_per_task(held_out):
    counts = np.bincount(held_out.task_ids, minlength=len(TASKS))
    assert counts.tolist() == [SMALL.n_eval_per_task] * len(TASKS)


def test_evaluate_counts_exact_matches_per_task(held_out):
    """An oracle scores 1; breaking one answer token of some samples lowers exactly their tasks."""
    batches = eval_batches(held_out, 128)

    def oracle(batch, broken=()):
        logits = torch.nn.functional.one_hot(batch.targets, 21).float()
        for b in broken:
            t = int(torch.nonzero(batch.loss_mask[b])[-1])
            logits[b, t] = torch.nn.functional.one_hot((batch.targets[b, t] + 1) % 21, 21).float()
        return logits

    assert evaluate(oracle, batches) == {task: 1.0 for task in TASKS}
    first = batches[0]
    broken = [b for b in range(first.size) if TASKS[first.task_ids[b]] == "sum"][:5]
    scores = evaluate(lambda batch: oracle(batch, broken if batch is first else ()), batches)
    assert scores == {"caption": 1.0, "sum": 1.0 - 5 / SMALL.n_eval_per_task, "largest": 1.0}


def test_config_round_trips_and_rejects_bad_values():
    cfg = DigitsTaskConfig(seed=3, task_mix=(1.0, 2.0, 3.0), tokens_per_image=4)
    assert DigitsTaskConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="task_mix"):
        DigitsTaskConfig(task_mix=(1.0, 1.0))
    with pytest.raises(ValueError, match="2 <= min <= max"):
        DigitsTaskConfig(min_relation_images=1)
    with pytest.raises(ValueError, match="rotate_deg=-1"):
        DigitsTaskConfig(rotate_deg=-1.0)
    with pytest.raises(ValueError, match=r"label_noise=1.0 must lie in \[0, 1\)"):
        DigitsTaskConfig(label_noise=1.0)
    with pytest.raises(ValueError, match=r"n_train=0 and n_eval_per_task=60 must both be >= 1"):
        DigitsTaskConfig(n_train=0, n_eval_per_task=60)
    with pytest.raises(ValueError, match=r"pack_len=-3 must be 0 \(no packing\) or at least"):
        DigitsTaskConfig(pack_len=-3)
    for fraction in (0.001, 0.999):  # a digit class left without training or eval images
        with pytest.raises(ValueError, match=rf"eval_fraction={fraction} leaves digit 0"):
            DigitsDataset(DigitsTaskConfig(n_train=50, n_eval_per_task=5, eval_fraction=fraction), "train")


def test_tokenizer_round_trip_and_unknown_word():
    tok = Tokenizer()
    ids = tok.encode("<bos> <image> plus <image> is 12 . <eos>")
    assert tok.decode(ids) == "<bos> <image> plus <image> is 1 2 . <eos>"
    assert tok.pad_id == 0 and len(set(tok.vocab)) == tok.vocab_size
    with pytest.raises(ValueError, match="'minus'"):
        tok.encode("<image> minus <image>")
