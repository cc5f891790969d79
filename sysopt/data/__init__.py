"""Interleaved image-text data: the tokenizer, the embedded digit tasks, batching and evaluation."""

from sysopt.data.batching import Batch, BatchSampler, collate, eval_batches
from sysopt.data.digits import (
    TASKS,
    DigitsDataset,
    DigitsTaskConfig,
    Sample,
    load_digit_images,
    normalized_images,
    split_images,
)
from sysopt.data.eval import evaluate
from sysopt.data.tokenizer import VOCAB, Tokenizer

__all__ = [
    "TASKS",
    "VOCAB",
    "Batch",
    "BatchSampler",
    "DigitsDataset",
    "DigitsTaskConfig",
    "Sample",
    "Tokenizer",
    "collate",
    "eval_batches",
    "evaluate",
    "load_digit_images",
    "normalized_images",
    "split_images",
]
