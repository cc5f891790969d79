"""Collating digit-task samples into fixed-shape tensor batches, and a deterministic sampler whose
global batch for a step can be cut into contiguous data-parallel (or microbatch) shards."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sysopt.data.augment import random_affine
from sysopt.data.digits import DigitsDataset, DigitsTaskConfig, sample_mix

PACK_OPEN_ROWS = 8  # rows pack_rows keeps open for first fit


@dataclass(frozen=True)
class Batch:
    """B sequences of fixed length T and the N images they show.

    tokens, targets: [B, T] long (targets are the next tokens; padding is 0 = <pad>);
    images: [N, 8, 8] float, grouped by sample in order of appearance;
    image_slots: [B, T] long, -1 at text positions, else the row of the flattened image-token table
        [N * k] (k = tokens per image) whose embedding goes there: image i, sub-token j -> i * k + j;
    image_owner: [N] long, the row of the sample each image belongs to;
    loss_mask: [B, T] float, 1 where targets[b, t] is an answer token; task_ids: [B] long into TASKS
        (of the row's first sample when rows are packed).

    Packed rows (see `pack_rows`) also carry segment_ids: [B, T] long, the number of the sample within its
    row (-1 at padding), and position_ids: [B, T] long, the position within that sample. Attention then
    stays inside a sample (causal and block-diagonal) and positions restart at every sample. Unpacked
    batches leave both None: one sample per row, positions 0..T-1.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    images: torch.Tensor
    image_slots: torch.Tensor
    image_owner: torch.Tensor
    loss_mask: torch.Tensor
    task_ids: torch.Tensor
    segment_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

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
            segment_ids=None if self.segment_ids is None else self.segment_ids[lo:hi],
            position_ids=None if self.position_ids is None else self.position_ids[lo:hi],
        )

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: v if v is None else v.to(device) for k, v in moved.items()})


def _image_table(
    dataset: DigitsDataset,
    indices: np.ndarray,
    image_perm: np.ndarray | None,
    augment_rng: np.random.Generator | None,
) -> torch.Tensor:
    """The images of samples `indices` in reading order (optionally permuted, optionally warped)."""
    n_images = dataset.n_images[indices]
    rows = dataset.image_rows[indices][np.arange(dataset.image_rows.shape[1]) < n_images[:, None]]
    if image_perm is not None:
        rows = rows[image_perm]
    rows = torch.from_numpy(rows)
    if augment_rng is None:
        return dataset.images.index_select(0, rows)
    cfg = dataset.config
    warped = random_affine(
        dataset.raw_images.index_select(0, rows), augment_rng, cfg.shift_px, cfg.rotate_deg, cfg.scale
    )
    return (warped - dataset.pixel_mean) / dataset.pixel_std


def _image_slots(tokens: np.ndarray, image_id: int) -> np.ndarray:
    """Image-token slots numbered in reading order across the batch (row-major): image i owns the k
    consecutive rows i*k .. i*k+k-1 of the flattened image-token table; -1 at text positions."""
    is_image = tokens == image_id
    return np.where(is_image, np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1, -1)


def collate(
    dataset: DigitsDataset,
    indices: np.ndarray,
    image_perm: np.ndarray | None = None,
    augment_rng: np.random.Generator | None = None,
) -> Batch:
    """The samples `indices` of `dataset` as one Batch (length dataset.config.seq_len), one per row.

    `image_perm`, a permutation of the batch's images, swaps image contents across samples while keeping
    every text: the shuffled-image control. `augment_rng` warps every image view with the config's
    random affine (training only)."""
    indices = np.asarray(indices, np.int64)
    sequences = dataset.template_tokens[dataset.template_of[indices]]
    tokens, targets = sequences[:, :-1], sequences[:, 1:]
    loss_mask = dataset.template_answer_mask[dataset.template_of[indices]][:, 1:]
    return Batch(
        tokens=torch.from_numpy(np.ascontiguousarray(tokens)),
        targets=torch.from_numpy(np.ascontiguousarray(targets)),
        images=_image_table(dataset, indices, image_perm, augment_rng),
        image_slots=torch.from_numpy(_image_slots(tokens, dataset.tokenizer.image_id)),
        image_owner=torch.from_numpy(np.repeat(np.arange(len(indices)), dataset.n_images[indices])),
        loss_mask=torch.from_numpy(np.ascontiguousarray(loss_mask)),
        task_ids=torch.from_numpy(dataset.task_ids[indices].astype(np.int64)),
    )


def sample_lengths(dataset: DigitsDataset, indices: np.ndarray) -> np.ndarray:
    """Input length of each sample (its tokens up to, not including, <eos>): what it fills in a row."""
    return dataset.template_lengths[dataset.template_of[np.asarray(indices, np.int64)]] - 1


def pack_rows(lengths: np.ndarray, row_len: int, open_rows: int = PACK_OPEN_ROWS) -> list[list[int]]:
    """Pack items of `lengths` (in order) into rows of at most `row_len`: bounded first fit.

    Each item goes into the first of the (at most `open_rows`) open rows it fits; if none, a new row opens
    and, past `open_rows`, the oldest open row is closed. Rows come out in closing order, items keep
    their relative order within a row, and every item appears exactly once. Deterministic."""
    if row_len < 1 or open_rows < 1:
        raise ValueError(f"row_len={row_len} and open_rows={open_rows} must both be >= 1")
    too_long = [int(n) for n in lengths if n > row_len]
    if too_long:
        raise ValueError(
            f"a sample of length {max(too_long)} does not fit pack_len={row_len}; raise pack_len to at "
            f"least {max(too_long)}"
        )
    closed: list[list[int]] = []
    rows: list[list[int]] = []
    free: list[int] = []
    for item, n in enumerate(int(x) for x in lengths):
        slot = next((r for r, room in enumerate(free) if room >= n), None)
        if slot is None:
            if len(rows) == open_rows:
                closed.append(rows.pop(0))
                free.pop(0)
            rows.append([])
            free.append(row_len)
            slot = len(rows) - 1
        rows[slot].append(item)
        free[slot] -= n
    return closed + rows


@functools.lru_cache(maxsize=16)
def expected_packing(config: DigitsTaskConfig, samples: int = 8192) -> tuple[float, float]:
    """(samples, images) a training row of config.pack_len tokens holds on average: `pack_rows` run over
    `samples` samples drawn (seeded) from `sample_mix`, the rows it still has open at the end left out.
    Pure Python, no data set built: what a cost model needs to know of packed rows."""
    if config.pack_len < 1:
        raise ValueError(f"pack_len={config.pack_len}: expected_packing needs packing (pack_len > 0)")
    mix = sample_mix(config)
    drawn = random.Random(0).choices(mix, weights=[p for p, _, _ in mix], k=samples)
    rows = pack_rows([length for _, length, _ in drawn], config.pack_len, PACK_OPEN_ROWS)
    closed = rows[:-PACK_OPEN_ROWS] or rows
    images = sum(drawn[i][2] for row in closed for i in row)
    return sum(len(row) for row in closed) / len(closed), images / len(closed)


def collate_packed(
    dataset: DigitsDataset,
    rows: list[np.ndarray] | list[list[int]],
    row_len: int,
    image_perm: np.ndarray | None = None,
    augment_rng: np.random.Generator | None = None,
) -> Batch:
    """Rows of several samples each (dataset indices per row) as one Batch of length `row_len`.

    Each sample keeps its own tokens, targets (the last target of a sample is its <eos>, never the next
    sample's first token) and loss mask; segment_ids / position_ids say which sample a position belongs
    to and where in it, so the decoder attends only within a sample. Padding fills the rest of a row."""
    pad = dataset.tokenizer.pad_id
    shape = (len(rows), row_len)
    tokens, targets = np.full(shape, pad, np.int64), np.full(shape, pad, np.int64)
    loss_mask = np.zeros(shape, np.float32)
    segments, positions = np.full(shape, -1, np.int64), np.zeros(shape, np.int64)
    for r, row in enumerate(rows):
        at = 0
        for segment, index in enumerate(row):
            template = dataset.template_of[index]
            n = dataset.template_lengths[template] - 1
            if at + n > row_len:
                raise ValueError(f"row {r} holds {at + n} tokens, more than pack_len={row_len}")
            tokens[r, at : at + n] = dataset.template_tokens[template, :n]
            targets[r, at : at + n] = dataset.template_tokens[template, 1 : n + 1]
            loss_mask[r, at : at + n] = dataset.template_answer_mask[template, 1 : n + 1]
            segments[r, at : at + n] = segment
            positions[r, at : at + n] = np.arange(n)
            at += n
    order = np.asarray([i for row in rows for i in row], np.int64)
    row_of_sample = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    return Batch(
        tokens=torch.from_numpy(tokens),
        targets=torch.from_numpy(targets),
        images=_image_table(dataset, order, image_perm, augment_rng),
        image_slots=torch.from_numpy(_image_slots(tokens, dataset.tokenizer.image_id)),
        image_owner=torch.from_numpy(np.repeat(row_of_sample, dataset.n_images[order])),
        loss_mask=torch.from_numpy(loss_mask),
        task_ids=torch.from_numpy(dataset.task_ids[[row[0] for row in rows]].astype(np.int64)),
        segment_ids=torch.from_numpy(segments),
        position_ids=torch.from_numpy(positions),
    )


class BatchSampler:
    """Deterministic batches of a dataset: `global_batch(step)` is a pure function of (config seed, step).

    With shuffle=True each epoch visits the samples in a fresh seeded order (a final partial batch is
    dropped); with shuffle=False batches follow the dataset order and `__iter__` yields the partial tail too.
    Data-parallel rank r of w trains on `global_batch(step).shard(r, w)`.

    When the training set's config has pack_len > 0, `global_batch` packs: each epoch's sample order is cut
    into rows of pack_len tokens (`pack_rows`), and a batch is `batch_size` such rows, so the number of
    samples per step varies while the shape does not. Epochs pack into different numbers of rows, so the
    rows of successive epochs form one stream and batch k is rows [k * batch_size, (k + 1) * batch_size) of
    it: every batch is full and no row is dropped (a batch at an epoch's end also holds the next epoch's
    first rows). Locating a step packs every epoch before it once (cached), so `global_batch(step)` stays a
    pure function of (seed, step). `__iter__` (evaluation) never packs."""

    def __init__(
        self, dataset: DigitsDataset, batch_size: int, shuffle: bool = True, shuffle_images: bool = False
    ) -> None:
        if not 1 <= batch_size <= len(dataset):
            raise ValueError(f"batch_size={batch_size} must lie in [1, {len(dataset)}] (the dataset size)")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.shuffle_images = shuffle, shuffle_images
        # eval batches depend on split_seed only (DigitsDataset): so does their shuffled-image control
        self.seed = dataset.config.seed if dataset.split == "train" else dataset.config.split_seed
        self.pack_len = dataset.config.pack_len if dataset.split == "train" else 0
        self._cached_order: tuple[int, np.ndarray] = (-1, np.arange(0))
        self._cached_rows: dict[int, list[list[int]]] = {}  # the last two epochs packed
        self._epoch_starts = [0]  # packed: the stream index of each counted epoch's first row, and the end
        if self.pack_len and len(self._rows(0)) < batch_size:
            raise ValueError(
                f"batch_size={batch_size} rows exceed the {len(self._rows(0))} packed rows of one epoch; "
                "use a smaller batch or more samples"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in an epoch; packed, in epoch 0 (later epochs pack into slightly more or fewer
        rows, and batches run on across epochs: see the class docstring)."""
        if self.pack_len:
            return len(self._rows(0)) // self.batch_size
        return len(self.dataset) // self.batch_size

    def _batch(self, indices: np.ndarray, tag: int, augment: bool = False, rows=None) -> Batch:
        perm = None
        if self.shuffle_images:
            n_images = int(self.dataset.n_images[indices].sum())
            perm = np.random.default_rng([self.seed, 17, tag]).permutation(n_images)
        augment_rng = np.random.default_rng([self.seed, 19, tag]) if augment else None
        if rows is not None:
            return collate_packed(self.dataset, rows, self.pack_len, perm, augment_rng)
        return collate(self.dataset, indices, perm, augment_rng)

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_order[0] != epoch:
            order = np.arange(len(self.dataset))
            if self.shuffle:
                order = np.random.default_rng([self.seed, 13, epoch]).permutation(len(self.dataset))
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def _rows(self, epoch: int) -> list[list[int]]:
        """The epoch's sample order packed into rows of pack_len tokens (dataset indices per row)."""
        if epoch not in self._cached_rows:
            order = self._order(epoch)
            packed = pack_rows(sample_lengths(self.dataset, order), self.pack_len)
            if len(self._cached_rows) >= 2:  # a batch spans at most two epochs
                del self._cached_rows[min(self._cached_rows)]
            self._cached_rows[epoch] = [[int(order[i]) for i in row] for row in packed]
        return self._cached_rows[epoch]

    def _epoch_of_row(self, row: int) -> int:
        """The epoch holding row `row` of the stream of packed rows (counting epochs up to it once)."""
        starts = self._epoch_starts
        while starts[-1] <= row:
            starts.append(starts[-1] + len(self._rows(len(starts) - 1)))
        return bisect.bisect_right(starts, row) - 1

    def rows(self, step: int) -> list[list[int]]:
        """Dataset indices of each packed row of the batch of `step` (pack_len > 0 only): rows
        [step * batch_size, (step + 1) * batch_size) of the stream of every epoch's packed rows."""
        if not self.pack_len:
            raise ValueError("rows() needs packing: set data.pack_len > 0 (e.g. 32)")
        out: list[list[int]] = []
        row, end = step * self.batch_size, (step + 1) * self.batch_size
        while row < end:
            epoch = self._epoch_of_row(row)
            offset = row - self._epoch_starts[epoch]
            taken = self._rows(epoch)[offset : offset + end - row]
            out.extend(taken)
            row += len(taken)
        return out

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of the samples in the global batch of `step` (in row order when packed)."""
        if self.pack_len:
            return np.asarray([i for row in self.rows(step) for i in row], np.int64)
        epoch, i = divmod(step, self.batches_per_epoch)
        return self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def global_batch(self, step: int) -> Batch:
        """The batch of `step`; training images are augmented when the config says so."""
        augment = self.dataset.split == "train" and self.dataset.config.augments
        rows = self.rows(step) if self.pack_len else None
        return self._batch(self.indices(step), step, augment, rows)

    def __iter__(self) -> Iterator[Batch]:
        """One pass over the dataset in order (the tail batch may be smaller): for evaluation."""
        for start in range(0, len(self.dataset), self.batch_size):
            yield self._batch(np.arange(start, min(start + self.batch_size, len(self.dataset))), start)


def eval_batches(dataset: DigitsDataset, batch_size: int = 500, shuffle_images: bool = False) -> list[Batch]:
    """All of `dataset` in order, as batches of at most batch_size."""
    return list(
        BatchSampler(dataset, min(batch_size, len(dataset)), shuffle=False, shuffle_images=shuffle_images)
    )
