"""Collating digit-task samples into fixed-shape tensor batches, and a deterministic sampler whose
global batch for a step can be cut into contiguous data-parallel (or microbatch) shards."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sysopt.data.augment import random_affine
from sysopt.data.digits import DigitsDataset


@dataclass(frozen=True)
class Batch:
    """B sequences of fixed length T and the N images they show.

    tokens, targets: [B, T] long (targets are the next tokens; padding is 0 = <pad>);
    images: [N, 8, 8] float, grouped by sample in order of appearance;
    image_slots: [B, T] long, -1 at text positions, else the row of the flattened image-token table
        [N * k] (k = tokens per image) whose embedding goes there: image i, sub-token j -> i * k + j;
    image_owner: [N] long, the row of the sample each image belongs to;
    loss_mask: [B, T] float, 1 where targets[b, t] is an answer token; task_ids: [B] long into TASKS.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    images: torch.Tensor
    image_slots: torch.Tensor
    image_owner: torch.Tensor
    loss_mask: torch.Tensor
    task_ids: torch.Tensor

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def tokens_per_image(self) -> int:
        n_images = self.images.shape[0]
        return int((self.image_slots >= 0).sum().item()) // n_images if n_images else 1

    def answer_token_count(self) -> torch.Tensor:
        """Number of answer tokens (the default loss normalizer), as a float tensor."""
        return self.loss_mask.sum()

    def shard(self, rank: int, world: int) -> Batch:
        """Rows [rank * B/world, (rank + 1) * B/world) with their images; slots re-indexed to the shard."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank={rank} world={world}: need world >= 1 and 0 <= rank < world")
        if self.size % world:
            raise ValueError(
                f"batch size {self.size} is not divisible by world={world}; use a batch size that is a "
                f"multiple of {world}"
            )
        rows = self.size // world
        lo, hi = rank * rows, (rank + 1) * rows
        keep = (self.image_owner >= lo) & (self.image_owner < hi)
        first_image = int(keep.long().argmax().item()) if bool(keep.any()) else 0
        slots = self.image_slots[lo:hi]
        slots = torch.where(slots >= 0, slots - first_image * self.tokens_per_image, slots)
        return Batch(
            tokens=self.tokens[lo:hi],
            targets=self.targets[lo:hi],
            images=self.images[keep],
            image_slots=slots,
            image_owner=self.image_owner[keep] - lo,
            loss_mask=self.loss_mask[lo:hi],
            task_ids=self.task_ids[lo:hi],
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def collate(
    dataset: DigitsDataset,
    indices: np.ndarray,
    image_perm: np.ndarray | None = None,
    augment_rng: np.random.Generator | None = None,
) -> Batch:
    """The samples `indices` of `dataset` as one Batch (length dataset.config.seq_len).

    `image_perm`, a permutation of the batch's images, swaps image contents across samples while keeping
    every text: the shuffled-image control. `augment_rng` warps every image view with the config's
    random affine (training only)."""
    indices = np.asarray(indices, np.int64)
    sequences = dataset.template_tokens[dataset.template_of[indices]]
    tokens, targets = sequences[:, :-1], sequences[:, 1:]
    loss_mask = dataset.template_answer_mask[dataset.template_of[indices]][:, 1:]
    n_images = dataset.n_images[indices]
    is_image = tokens == dataset.tokenizer.image_id
    # image-token slots are numbered in reading order across the batch: sample b's images come after
    # those of samples < b, each image owning k consecutive rows of the flattened image-token table
    slots = np.where(is_image, np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1, -1)
    rows = dataset.image_rows[indices][np.arange(dataset.image_rows.shape[1]) < n_images[:, None]]
    if image_perm is not None:
        rows = rows[image_perm]
    rows = torch.from_numpy(rows)
    if augment_rng is None:
        images = dataset.images.index_select(0, rows)
    else:
        cfg = dataset.config
        warped = random_affine(
            dataset.raw_images.index_select(0, rows), augment_rng, cfg.shift_px, cfg.rotate_deg, cfg.scale
        )
        images = (warped - dataset.pixel_mean) / dataset.pixel_std
    return Batch(
        tokens=torch.from_numpy(np.ascontiguousarray(tokens)),
        targets=torch.from_numpy(np.ascontiguousarray(targets)),
        images=images,
        image_slots=torch.from_numpy(slots),
        image_owner=torch.from_numpy(np.repeat(np.arange(len(indices)), n_images)),
        loss_mask=torch.from_numpy(np.ascontiguousarray(loss_mask)),
        task_ids=torch.from_numpy(dataset.task_ids[indices].astype(np.int64)),
    )


class BatchSampler:
    """Deterministic batches of a dataset: `global_batch(step)` is a pure function of (config seed, step).

    With shuffle=True each epoch visits the samples in a fresh seeded order (a final partial batch is
    dropped); with shuffle=False batches follow the dataset order and `__iter__` yields the partial tail too.
    Data-parallel rank r of w trains on `global_batch(step).shard(r, w)`."""

    def __init__(
        self, dataset: DigitsDataset, batch_size: int, shuffle: bool = True, shuffle_images: bool = False
    ) -> None:
        if not 1 <= batch_size <= len(dataset):
            raise ValueError(f"batch_size={batch_size} must lie in [1, {len(dataset)}] (the dataset size)")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.shuffle_images = shuffle, shuffle_images
        self.seed = dataset.config.seed
        self._cached_order: tuple[int, np.ndarray] = (-1, np.arange(0))

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def _batch(self, indices: np.ndarray, tag: int, augment: bool = False) -> Batch:
        perm = None
        if self.shuffle_images:
            n_images = int(self.dataset.n_images[indices].sum())
            perm = np.random.default_rng([self.seed, 17, tag]).permutation(n_images)
        augment_rng = np.random.default_rng([self.seed, 19, tag]) if augment else None
        return collate(self.dataset, indices, perm, augment_rng)

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_order[0] != epoch:
            order = np.arange(len(self.dataset))
            if self.shuffle:
                order = np.random.default_rng([self.seed, 13, epoch]).permutation(len(self.dataset))
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of `step`."""
        epoch, i = divmod(step, self.batches_per_epoch)
        return self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def global_batch(self, step: int) -> Batch:
        """The batch of `step`; training images are augmented when the config says so."""
        augment = self.dataset.split == "train" and self.dataset.config.augments
        return self._batch(self.indices(step), step, augment)

    def __iter__(self) -> Iterator[Batch]:
        """One pass over the dataset in order (the tail batch may be smaller): for evaluation."""
        for start in range(0, len(self.dataset), self.batch_size):
            yield self._batch(np.arange(start, min(start + self.batch_size, len(self.dataset))), start)


def eval_batches(dataset: DigitsDataset, batch_size: int = 500, shuffle_images: bool = False) -> list[Batch]:
    """All of `dataset` in order, as batches of at most batch_size."""
    return list(
        BatchSampler(dataset, min(batch_size, len(dataset)), shuffle=False, shuffle_images=shuffle_images)
    )
