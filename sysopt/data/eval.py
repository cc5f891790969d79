"""Exact-match evaluation of a model on digit-task batches, per task."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from sysopt.data.batching import Batch
from sysopt.data.digits import TASKS


@torch.no_grad()
def evaluate(model: Callable[[Batch], torch.Tensor], batches: Iterable[Batch]) -> dict[str, float]:
    """{task: share of samples whose every answer token is the argmax prediction}.

    Teacher-forced: each answer token is predicted from the true tokens before it (for a two-digit sum
    the second digit sees the true first digit), which equals greedy decoding of the answer's digits
    whenever the sample counts as correct. Where the answer stops is not scored (the "." after it is
    neither trained nor scored): a greedy decoder could run on with another digit (after a sum's "1" it
    has learnt that a digit often follows), so this is answer-digit accuracy, not generation accuracy.
    `model(batch)` returns [B, T, vocab] logits; an nn.Module is put in eval mode (and left there)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    correct = torch.zeros(len(TASKS), dtype=torch.float64)
    total = torch.zeros(len(TASKS), dtype=torch.float64)
    for batch in batches:
        hit = (model(batch).argmax(-1) == batch.targets) | (batch.loss_mask == 0)
        sample_ok = hit.all(dim=1).double()
        task_ids, sample_ok = batch.task_ids.cpu(), sample_ok.cpu()  # the tallies live on the host
        correct.index_add_(0, task_ids, sample_ok)
        total.index_add_(0, task_ids, torch.ones_like(sample_ok))
    return {task: float(correct[i] / total[i]) for i, task in enumerate(TASKS) if total[i] > 0}
