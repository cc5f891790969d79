"""The VLM: block structure, layers against torch references, image placement, loss and data-parallel math."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sysopt.data import BatchSampler, DigitsDataset, DigitsTaskConfig, eval_batches, evaluate
from sysopt.models import (
    VLM,
    ImageTextMerge,
    LMHead,
    SelfAttention,
    VisionEmbed,
    VLMConfig,
    vlm_loss,
)
from sysopt.models.decoder import TransformerBlock

TINY = VLMConfig(vision_dim=16, vision_layers=1, vision_heads=2, dim=32, layers=2, heads=4, mlp_ratio=2)
DATA = DigitsTaskConfig(n_train=2000, n_eval_per_task=60)


@pytest.fixture(scope="module")
def data():
    return DigitsDataset(DATA, "train")


@pytest.fixture(scope="module")
def batch(data):
    return BatchSampler(data, 16).global_batch(0)


def test_blocks_are_in_execution_order_and_forward_loops_them(batch):
    model = VLM(TINY)
    kinds = [type(b) for b in model.blocks]
    assert kinds[0] is VisionEmbed and kinds[-1] is LMHead and kinds[2] is ImageTextMerge
    assert all(isinstance(b, TransformerBlock) for b in model.blocks[1:2] + model.blocks[3:-1])
    assert [b.attn.causal for b in model.blocks if isinstance(b, TransformerBlock)] == [False, True, True]
    x = None
    for block in model.blocks:
        x = block(x, batch)
    logits = model(batch)
    assert logits.shape == (*batch.tokens.shape, TINY.vocab_size)
    assert torch.equal(logits, x)
    assert model.param_count() == sum(p.numel() for p in model.parameters())
    assert all(type(m) is not torch.nn.MultiheadAttention for m in model.modules())


def test_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = VLM(TINY), VLM(TINY), VLM(dataclasses.replace(TINY, seed=1))
    assert torch.equal(torch.rand(1), before)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_matches_torch_multihead_attention(causal):
    torch.manual_seed(0)
    ours = SelfAttention(32, 4, causal)
    ref = torch.nn.MultiheadAttention(32, 4)  # also [S, B, D]
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(7, 3, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch_size", [2, 4])
def test_vision_embed_cuts_patches_like_unfold(patch_size, batch):
    embed = VisionEmbed(8, patch_size, 16)
    patches = F.unfold(batch.images[:, None], kernel_size=patch_size, stride=patch_size)  # [N, p*p, P]
    expected = embed.patch(patches.permute(2, 0, 1)) + embed.pos
    torch.testing.assert_close(embed(None, batch), expected)


def _first_slot(batch, b, image):
    k = batch.tokens_per_image
    return int(torch.nonzero(batch.image_slots[b] == image * k)[0])


@pytest.mark.parametrize("tokens_per_image", [1, 4])
def test_an_image_only_affects_its_own_sample_from_its_position_on(tokens_per_image):
    data = DigitsDataset(dataclasses.replace(DATA, tokens_per_image=tokens_per_image), "train")
    batch = BatchSampler(data, 16).global_batch(2)
    model = VLM(dataclasses.replace(TINY, tokens_per_image=tokens_per_image)).eval()
    image = int(torch.nonzero(batch.image_owner == 5)[-1])  # the last image of sample 5
    changed = dataclasses.replace(batch, images=batch.images.clone())
    changed.images[image] = torch.randn(8, 8)
    diff = (model(batch) - model(changed)).abs().amax(-1)  # [B, T]
    start = _first_slot(batch, 5, image)
    others = torch.ones(batch.size, dtype=torch.bool)
    others[5] = False
    assert diff[others].max() == 0
    assert diff[5, :start].max() == 0
    assert diff[5, start:].min() > 0


def test_text_is_causal(batch):
    model = VLM(TINY).eval()
    changed = dataclasses.replace(batch, tokens=batch.tokens.clone())
    changed.tokens[:, 6] = (changed.tokens[:, 6] + 1) % TINY.vocab_size
    diff = (model(batch) - model(changed)).abs().amax(-1)
    assert diff[:, :6].max() == 0 and diff[:, 6].min() > 0


def test_loss_is_cross_entropy_over_answer_tokens(batch):
    torch.manual_seed(0)
    logits = torch.randn(*batch.tokens.shape, TINY.vocab_size)
    rows, cols = torch.nonzero(batch.loss_mask, as_tuple=True)
    expected = F.cross_entropy(logits[rows, cols], batch.targets[rows, cols])
    torch.testing.assert_close(vlm_loss(logits, batch), expected)
    torch.testing.assert_close(vlm_loss(logits, batch, normalizer=10.0), expected * len(rows) / 10.0)


def test_data_parallel_shards_with_global_normalizer_sum_to_the_full_batch_gradient(data):
    """rank r of w: loss(shard r) / global answer count; summing gradients == single-process training."""
    model = VLM(TINY)
    batch = BatchSampler(data, 24).global_batch(1)
    vlm_loss(model(batch), batch).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for rank in range(3):
        shard = batch.shard(rank, 3)
        vlm_loss(model(shard), shard, normalizer=batch.answer_token_count()).backward()
    for p, g in zip(model.parameters(), full):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_config_round_trips_and_rejects_bad_shapes(batch):
    assert VLMConfig.from_json(TINY.to_json()) == TINY
    with pytest.raises(ValueError, match="tokens_per_image=3"):
        VLMConfig(tokens_per_image=3)
    with pytest.raises(ValueError, match="not divisible by heads=5"):
        VLM(dataclasses.replace(TINY, heads=5))
    with pytest.raises(ValueError, match="exceeds max_seq=8"):
        VLM(dataclasses.replace(TINY, max_seq=8))(batch)


@pytest.fixture
def one_thread():
    """Training in tests runs on one thread: two threads on a shared 2-core machine crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_briefly(config, data_config, steps, batch_size, lr):
    """AdamW with linear warmup (10% of steps) and cosine decay, loss on answer tokens only."""
    model = VLM(config)
    sampler = BatchSampler(DigitsDataset(data_config, "train"), batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    for step in range(steps):
        batch = sampler.global_batch(step)
        opt.zero_grad()
        vlm_loss(model(batch), batch).backward()
        opt.step()
        schedule.step()
    return model


def _chance(held_out, task):
    """Best constant guess: the share of the most common answer of `task` in the eval split."""
    answers = held_out.answers[held_out.task_ids == ("caption", "sum", "largest").index(task)]
    return float(torch.bincount(torch.as_tensor(answers)).max() / len(answers))


def test_captions_need_the_images(one_thread):
    """A tiny model trained briefly on captions reads digits; with images shuffled across samples it
    falls to about chance (the most common answer's share)."""
    captions = dataclasses.replace(
        DATA, task_mix=(1.0, 0.0, 0.0), n_eval_per_task=300, shift_px=0.0, rotate_deg=0.0
    )
    model = _train_briefly(TINY, captions, steps=100, batch_size=64, lr=1e-2)
    held_out = DigitsDataset(captions, "eval")
    real = evaluate(model, eval_batches(held_out))["caption"]
    shuffled = evaluate(model, eval_batches(held_out, shuffle_images=True))["caption"]
    chance = _chance(held_out, "caption")
    assert real > chance + 0.3
    assert shuffled < chance + 0.1


@pytest.mark.slow
def test_all_tasks_need_the_images_with_the_default_model(one_thread):
    data_config = DigitsTaskConfig()
    model = _train_briefly(VLMConfig(), data_config, steps=300, batch_size=128, lr=3e-3)
    held_out = DigitsDataset(data_config, "eval")
    real = evaluate(model, eval_batches(held_out))
    shuffled = evaluate(model, eval_batches(held_out, shuffle_images=True))
    for task in real:
        chance = _chance(held_out, task)
        assert real[task] > chance + 0.3, (task, real[task], chance)
        assert shuffled[task] < chance + 0.1, (task, shuffled[task], chance)


def test_a_model_that_does_not_match_the_images_refuses_them(batch):
    """Images of another size would broadcast the positional table over the wrong patches, and a model
    with another tokens_per_image would put patch i % k of image i // k in slot i: both fail by name."""
    wrong_size = VLM(dataclasses.replace(TINY, image_size=16, patch_size=8, tokens_per_image=4))
    with pytest.raises(ValueError, match=r"images are 8x8 but model.image_size=16"):
        wrong_size(batch)
    per_patch = VLM(dataclasses.replace(TINY, tokens_per_image=4))  # the data has 1 slot per image
    with pytest.raises(ValueError, match=r"data.tokens_per_image must equal model.tokens_per_image"):
        per_patch(batch)
    with pytest.raises(ValueError, match=r"patch_size=0 must lie in \[1, image_size=8\]"):
        VLMConfig(patch_size=0)
