"""The megatron-core adapter: megatron-core 0.16.1's own interleaved schedule and sysopt schedules
driven through make_forward_backward_func give the same gradients and loss dicts (pp=4, vpp=2, gloo)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sysopt.dist import launch

pytest.importorskip("megatron.core")

PP, VPP, M = 4, 2, 8
SEQ, MBS, HIDDEN = 4, 2, 8


class _Chunk(nn.Module):
    """A model chunk as megatron-core's schedules expect: config, model_type, set_input_tensor."""

    def __init__(self, stage: int, config, model_type):
        super().__init__()
        torch.manual_seed(100 + stage)
        self.stage, self.config, self.model_type = stage, config, model_type
        self.fc1, self.fc2 = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.input_tensor = None

    def set_input_tensor(self, tensors):
        self.input_tensor = tensors[0]

    def forward(self, data):
        x = data if self.stage == 0 else self.input_tensor
        return self.fc2(torch.tanh(self.fc1(x)))


def _microbatches(seq: int = SEQ):
    g = torch.Generator().manual_seed(9)
    return [(torch.randn(seq, MBS, HIDDEN, generator=g), torch.randn(seq, MBS, HIDDEN, generator=g)) for _ in range(M)]  # fmt: skip


def _forward_step(with_tokens: bool):
    def forward_step(data_iterator, model):
        x, target = next(data_iterator)
        output = model(x)

        def loss_func(out):
            per_element = (out - target) ** 2
            if with_tokens:  # megatron's (loss_sum, num_tokens, reduced) form
                return (
                    per_element.sum(),
                    torch.tensor(per_element.numel()),
                    {"loss": per_element.mean().detach()},
                )
            return per_element.mean(), {"loss": per_element.mean().detach()}

        return output, loss_func

    return forward_step


def _run():
    from megatron.core import parallel_state as ps
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from sysopt.dist.megatron_shims import megatron_cpu_shims
    from sysopt.schedules import build
    from sysopt.schedules.megatron_adapter import make_forward_backward_func
    from sysopt.schedules.wgrad import make_deferrable

    ps.initialize_model_parallel(pipeline_model_parallel_size=PP, virtual_pipeline_model_parallel_size=VPP)
    config = TransformerConfig(
        num_layers=PP * VPP, hidden_size=HIDDEN, num_attention_heads=1, pipeline_model_parallel_size=PP,
        virtual_pipeline_model_parallel_size=VPP, pipeline_dtype=torch.float32, params_dtype=torch.float32,
        use_cpu_initialization=True, batch_p2p_comm=False, batch_p2p_sync=False,
    )  # fmt: skip
    rank = dist.get_rank()

    def _chunks(stages):
        return [_Chunk(s, config, ModelType.encoder_or_decoder) for s in stages]

    def run(
        fb_func,
        stages,
        *,
        with_tokens=False,
        deferrable=False,
        forward_only=False,
        seq=SEQ,
        scale=None,
        chunks=None,
    ):
        chunks = chunks or _chunks(stages)
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        if deferrable:
            for chunk in chunks:
                make_deferrable(chunk)
        data = _microbatches(seq)
        config.grad_scale_func = (
            None if scale is None else (lambda loss: loss * scale)
        )  # an optimizer's loss scale
        with megatron_cpu_shims():
            out = fb_func(
                forward_step_func=_forward_step(with_tokens), data_iterator=[iter(data) for _ in chunks],
                model=chunks, num_microbatches=M, seq_length=seq, micro_batch_size=MBS, forward_only=forward_only,
            )  # fmt: skip
        config.grad_scale_func = None
        grads = {
            c.stage: [None if p.grad is None else p.grad.tolist() for p in c.parameters()] for c in chunks
        }
        return [{k: v.item() for k, v in d.items()} for d in out], grads

    loop = build("interleaved_1f1b", PP, VPP, M).stages_of(rank)
    megatron = get_forward_backward_func()
    results = {
        "megatron": run(megatron, loop),
        "megatron_tokens": run(megatron, loop, with_tokens=True),
        "megatron_eval": run(megatron, loop, forward_only=True),
        "interleaved_1f1b": run(make_forward_backward_func("interleaved_1f1b"), loop),
        "zb_h1_deferred": run(make_forward_backward_func("zb_h1"), loop, deferrable=True),
        "zb_h1_tokens": run(make_forward_backward_func("zb_h1"), loop, with_tokens=True),
        "interleaved_eval": run(make_forward_backward_func("interleaved_1f1b"), loop, forward_only=True),
        "megatron_scaled": run(megatron, loop, scale=8.0),
        "interleaved_scaled": run(make_forward_backward_func("interleaved_1f1b"), loop, scale=8.0),
        "megatron_seq6": run(megatron, loop, seq=6),
        # boundary shapes given as a function of (stage, microbatch), as a vision tower's would be
        "interleaved_shape_fn": run(
            make_forward_backward_func(
                "interleaved_1f1b", boundary_shape=lambda stage, mb: (SEQ, MBS, HIDDEN)
            ),
            loop,
        ),
    }
    # one adapter function called again with another sequence length (its executors are cached per shape)
    again, same_chunks = make_forward_backward_func("interleaved_1f1b"), _chunks(loop)
    run(again, loop, chunks=same_chunks)
    results["interleaved_seq6"] = run(again, loop, seq=6, chunks=same_chunks)
    ps.destroy_model_parallel()
    return results


@pytest.mark.slow  # four ranks each import megatron-core (~8 s of CPU apiece); the run itself takes ~1 s
@pytest.mark.timeout(240)
def test_sysopt_schedules_match_megatron_core_interleaved():
    per_rank = launch(_run, PP, timeout_s=200)
    pairs = [
        ("megatron", "interleaved_1f1b"),
        ("megatron", "zb_h1_deferred"),
        ("megatron_tokens", "zb_h1_tokens"),
        ("megatron_eval", "interleaved_eval"),
        ("megatron_scaled", "interleaved_scaled"),
        ("megatron_seq6", "interleaved_seq6"),
        ("megatron", "interleaved_shape_fn"),
    ]
    for rank, results in enumerate(per_rank):
        for theirs, ours in pairs:
            (their_losses, their_grads), (our_losses, our_grads) = results[theirs], results[ours]
            assert len(their_losses) == len(our_losses) == (M if rank == PP - 1 else 0)
            for want, got in zip(their_losses, our_losses):
                assert got.keys() == want.keys() and got["loss"] == pytest.approx(want["loss"], rel=1e-6)
            for stage, grads in their_grads.items():
                for want, got in zip(grads, our_grads[stage]):
                    if want is None:
                        assert got is None, (ours, stage)
                    else:
                        torch.testing.assert_close(
                            torch.tensor(got), torch.tensor(want), msg=f"{ours} {stage}"
                        )
        assert any(g is not None for gs in results["megatron"][1].values() for g in gs)
