"""Embedded interleaved image-text data: scikit-learn's 1,797 8x8 digit images turned into short
sequences (captions, two-image sums, largest-of-several) that can only be answered by reading the images."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sysopt.data.tokenizer import Tokenizer

TASKS = ("caption", "sum", "largest")
ANSWER_COUNTS = (10, 19, 10)  # the possible answers of each task: 0-9, 0-18, 0-9
IMAGE_SIZE = 8
_SPLIT_CODES = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class DigitsTaskConfig:
    """How the digit sequences are drawn; the same config always gives the same samples."""

    seed: int = 0  # draws the training sequences, their order and the augmentation
    split_seed: int = 0  # draws the held-out images and the eval sequences; runs with other seeds compare
    eval_fraction: float = 0.2  # share of each digit class's images held out for eval
    n_train: int = 200_000  # training sequences (drawn from training images only)
    n_eval_per_task: int = 1000  # eval sequences per task (drawn from held-out images only)
    task_mix: tuple[float, ...] = (1.0, 1.0, 1.0)  # training weights of TASKS
    min_relation_images: int = 2
    max_relation_images: int = 4
    tokens_per_image: int = 1  # <image> placeholder positions per image
    # training images are warped afresh in every batch (eval images never): a random shift of up to
    # shift_px pixels per axis, rotation of up to rotate_deg degrees, zoom of up to +-scale
    shift_px: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.0
    # training rows: 0 = one sample per row padded to seq_len; L > 0 = samples packed into rows of L
    # tokens, attention kept within each sample (block-diagonal causal) and positions restarting per sample
    pack_len: int = 0
    # share of training sequences whose answer is replaced by one drawn uniformly from the task's answers
    # (the true one included), afresh per sequence: an irreducible loss floor the model cannot memorise,
    # so that final loss compares runs (see DigitsDataset.label_noise_floor); eval answers stay clean
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if len(self.task_mix) != len(TASKS) or min(self.task_mix) < 0 or sum(self.task_mix) <= 0:
            raise ValueError(
                f"task_mix={self.task_mix} must be {len(TASKS)} non-negative weights for {TASKS}, not all zero"
            )
        if not 2 <= self.min_relation_images <= self.max_relation_images:
            raise ValueError(
                f"relation images min={self.min_relation_images} max={self.max_relation_images} need "
                "2 <= min <= max"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must lie in (0, 1), e.g. 0.2")
        if min(self.shift_px, self.rotate_deg, self.scale) < 0 or self.scale >= 1:
            raise ValueError(
                f"augmentation shift_px={self.shift_px} rotate_deg={self.rotate_deg} scale={self.scale} "
                "must be >= 0 (0 turns it off), with scale < 1"
            )
        if self.n_train < 1 or self.n_eval_per_task < 1:
            raise ValueError(
                f"n_train={self.n_train} and n_eval_per_task={self.n_eval_per_task} must both be >= 1, "
                "e.g. n_train=2000 n_eval_per_task=60"
            )
        if self.pack_len < 0:
            raise ValueError(f"pack_len={self.pack_len} must be 0 (no packing) or at least {self.seq_len}")
        if 0 < self.pack_len < self.seq_len:
            raise ValueError(
                f"pack_len={self.pack_len} is shorter than the longest sample ({self.seq_len} tokens); use 0 "
                f"(no packing) or at least {self.seq_len}"
            )
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(
                f"label_noise={self.label_noise} must lie in [0, 1): the share of training answers drawn at "
                "random (0 turns it off, e.g. 0.1)"
            )
        if self.tokens_per_image < 1:
            raise ValueError(f"tokens_per_image={self.tokens_per_image} must be >= 1")

    @property
    def max_images_per_sample(self) -> int:
        return max(2, self.max_relation_images)

    @property
    def augments(self) -> bool:
        return max(self.shift_px, self.rotate_deg, self.scale) > 0

    @property
    def seq_len(self) -> int:
        """Input length of every sample (tokens shifted by one against targets), padding included."""
        k = self.tokens_per_image
        longest_sum = 7 + 2 * k  # <bos> I plus I is d d . <eos>
        longest_relation = 8 + self.max_relation_images * k  # <bos> I I .. : the largest is d . <eos>
        return max(longest_sum, longest_relation) - 1

    @property
    def row_len(self) -> int:
        """Length of a training row: pack_len when packing, else seq_len (eval rows are always seq_len)."""
        return self.pack_len or self.seq_len

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DigitsTaskConfig:
        fields = json.loads(text)
        fields["task_mix"] = tuple(fields["task_mix"])
        return cls(**fields)


@dataclass(frozen=True)
class Sample:
    """One sequence: token ids (each image expanded into tokens_per_image <image> ids), the image-table
    rows of its images in order of appearance, and the positions of its answer tokens in token_ids."""

    token_ids: tuple[int, ...]
    image_ids: tuple[int, ...]
    answer_positions: tuple[int, ...]
    task: str
    answer: int


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 images as float32 [1797, 8, 8] scaled to [0, 1] (raw pixels are 0..16), and their labels.

    Reads the CSV that scikit-learn ships (what `sklearn.datasets.load_digits` reads) without importing
    sklearn.datasets, which costs ~2 s per process; falls back to load_digits if the file moved."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, labels = digits.data, digits.target
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, IMAGE_SIZE, IMAGE_SIZE) / 16.0
    return images, np.asarray(labels, dtype=np.int64)


def split_images(config: DigitsTaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of image rows into (train, eval); the two never share an image."""
    _, labels = load_digit_images()
    rng = np.random.default_rng([config.split_seed, 7])
    train, held_out = [], []
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        n_eval = int(round(config.eval_fraction * len(rows)))
        if not 0 < n_eval < len(rows):
            raise ValueError(
                f"eval_fraction={config.eval_fraction} leaves digit {digit} ({len(rows)} images) with "
                f"{len(rows) - n_eval} training and {n_eval} eval images; both need one: use a fraction in "
                f"[{1 / len(rows):.3g}, {1 - 1 / len(rows):.3g}], e.g. 0.2"
            )
        held_out.append(rows[:n_eval])
        train.append(rows[n_eval:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def pixel_stats(config: DigitsTaskConfig) -> tuple[float, float]:
    """Mean and std of the training images' pixels (in [0, 1] units), used to standardise all images."""
    images, _ = load_digit_images()
    train_rows, _ = split_images(config)
    train = images.index_select(0, torch.as_tensor(train_rows))
    return float(train.mean()), float(train.std())


def normalized_images(config: DigitsTaskConfig) -> torch.Tensor:
    """The image table standardised with the training pixels' mean and std: [1797, 8, 8]."""
    mean, std = pixel_stats(config)
    return (load_digit_images()[0] - mean) / std


def _balanced_picks(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """`count` rows from `pool`, each used as evenly as possible (concatenated random permutations)."""
    reps = -(-count // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:count]


def encode_sample(
    tok: Tokenizer, tokens_per_image: int, task: str, n_images: int, answer: int
) -> tuple[list[int], tuple[int, ...]]:
    """A sample's token ids (<bos> prompt answer . <eos>) and the positions of its answer tokens."""
    image = [tok.image_id] * tokens_per_image
    if task == "caption":
        prompt = image + tok.encode("shows")
    elif task == "sum":
        prompt = image + tok.encode("plus") + image + tok.encode("is")
    else:
        prompt = image * n_images + tok.encode(": the largest is")
    head, answer_ids = [tok.bos_id] + prompt, tok.encode(str(answer))
    positions = tuple(range(len(head), len(head) + len(answer_ids)))
    return head + answer_ids + tok.encode(".") + [tok.eos_id], positions


def _clean_answers(task: str, n_images: int) -> list[float]:
    """Probability of each answer of `task` with uniformly distributed digits (the balanced image picks
    make them so, up to the data set's class sizes)."""
    if task == "caption":
        return [0.1] * 10
    if task == "sum":
        return [(10 - abs(s - 9)) / 100 for s in range(19)]
    return [((d + 1) ** n_images - d**n_images) / 10**n_images for d in range(10)]  # the largest of n


@functools.lru_cache(maxsize=16)
def sample_mix(config: DigitsTaskConfig) -> tuple[tuple[float, int, int], ...]:
    """The training samples of `config` in distribution, as (probability, input tokens, images): tasks
    by task_mix, relation image counts uniform in [min, max]_relation_images, answers as uniform digits
    make them (with label_noise, that share drawn uniformly from the task's answers). Input tokens are a
    sample's tokens up to <eos>, what it fills in a packed row (batching.sample_lengths)."""
    tok, weights = Tokenizer(), config.task_mix
    counts = {
        "caption": (1,),
        "sum": (2,),
        "largest": tuple(range(config.min_relation_images, config.max_relation_images + 1)),
    }
    mix: dict[tuple[int, int], float] = {}
    for task, weight, answers in zip(TASKS, weights, ANSWER_COUNTS):
        for n in counts[task]:
            p_shape = weight / sum(weights) / len(counts[task])
            clean = _clean_answers(task, n)
            for answer in range(answers):
                p = (1 - config.label_noise) * clean[answer] + config.label_noise / answers
                length = len(encode_sample(tok, config.tokens_per_image, task, n, answer)[0]) - 1
                mix[(length, n)] = mix.get((length, n), 0.0) + p_shape * p
    return tuple((p, length, n) for (length, n), p in sorted(mix.items()) if p > 0)


class DigitsDataset:
    """The sequences of one split ("train" or "eval").

    A sample is a task, its image rows and its answer; its token sequence is one of a few dozen templates
    (task x image count x answer), so batches are assembled by table look-ups (see batching.collate)."""

    def __init__(self, config: DigitsTaskConfig, split: str) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split={split!r} must be one of {tuple(_SPLIT_CODES)}")
        self.config, self.split = config, split
        self.tokenizer = Tokenizer()
        self.raw_images, self.labels = load_digit_images()
        self.pixel_mean, self.pixel_std = pixel_stats(config)
        self.images = (self.raw_images - self.pixel_mean) / self.pixel_std
        train_rows, eval_rows = split_images(config)
        self.image_pool = train_rows if split == "train" else eval_rows
        # the eval sequences depend on split_seed only: runs with different seeds score the same questions
        rng = np.random.default_rng(
            [config.seed if split == "train" else config.split_seed, 11, _SPLIT_CODES[split]]
        )
        if split == "train":
            mix = np.asarray(config.task_mix, dtype=np.float64)
            self.task_ids = rng.choice(len(TASKS), size=config.n_train, p=mix / mix.sum())
        else:
            self.task_ids = np.repeat(np.arange(len(TASKS)), config.n_eval_per_task)
        n, width = len(self.task_ids), config.max_images_per_sample
        n_relation = rng.integers(config.min_relation_images, config.max_relation_images + 1, size=n)
        self.n_images = np.choose(self.task_ids, [np.ones(n, np.int64), np.full(n, 2), n_relation])
        self.image_rows = _balanced_picks(rng, self.image_pool, n * width).reshape(n, width)
        digits = np.where(np.arange(width) < self.n_images[:, None], self.labels[self.image_rows], -1)
        self.answers = np.choose(self.task_ids, [digits[:, 0], digits[:, 0] + digits[:, 1], digits.max(1)])
        self.clean_answers = self.answers
        if split == "train" and config.label_noise > 0:
            # a stream apart from the images, tasks and clean answers (those of the noiseless dataset). Not
            # apart from the sampler's: numpy pads a seed list with zeros, so this is the stream of the
            # epoch-0 shuffle, default_rng([seed, 13, 0]); no correlation was measurable (flip rate by
            # shuffled position 0.096-0.106 at p=0.1), and a new tag would change the committed noisy runs
            noise_rng = np.random.default_rng([config.seed, 13])
            flip = noise_rng.random(n) < config.label_noise
            drawn = np.floor(noise_rng.random(n) * np.asarray(ANSWER_COUNTS)[self.task_ids]).astype(np.int64)
            self.answers = np.where(flip, drawn, self.clean_answers)
        self._build_templates()

    def _build_templates(self) -> None:
        """One token sequence per distinct (task, image count, answer), padded into look-up tables."""
        keys = np.stack([self.task_ids, self.n_images, self.answers], axis=1)
        unique, self.template_of = np.unique(keys, axis=0, return_inverse=True)
        self.template_of = self.template_of.reshape(-1)
        self.templates = [self._encode(TASKS[t], int(n), int(a)) for t, n, a in unique]
        length = self.config.seq_len + 1
        self.template_tokens = np.full((len(unique), length), self.tokenizer.pad_id, np.int64)
        self.template_answer_mask = np.zeros((len(unique), length), np.float32)
        self.template_lengths = np.asarray([len(ids) for ids, _ in self.templates], np.int64)
        for row, (ids, positions) in enumerate(self.templates):
            self.template_tokens[row, : len(ids)] = ids
            self.template_answer_mask[row, list(positions)] = 1.0

    def _encode(self, task: str, n_images: int, answer: int) -> tuple[list[int], tuple[int, ...]]:
        return encode_sample(self.tokenizer, self.config.tokens_per_image, task, n_images, answer)

    def __len__(self) -> int:
        return len(self.task_ids)

    def label_noise_floor(self) -> float:
        """The least mean answer-token cross-entropy any model can reach on this split (nats): that of the
        predictor that reads every image right and knows the noise, so that each answer is the clean one
        with probability 1 - p + p/K and any other of the task's K answers with p/K.

        Per answer token it predicts the next digit from the digits before it, among the answers that have
        that many digits or more (the "." after the answer is not an answer token). The figure is exact for
        this split's tasks and clean answers: expected loss over expected answer tokens, sample-weighted."""
        p = self.config.label_noise if self.split == "train" else 0.0
        loss = tokens = 0.0
        keys, counts = np.unique(np.stack([self.task_ids, self.clean_answers], 1), axis=0, return_counts=True)
        for (task, clean), count in zip(keys, counts):
            k = ANSWER_COUNTS[task]
            q = {str(a): p / k + (1.0 - p) * (a == clean) for a in range(k)}
            for answer, qa in q.items():
                if qa == 0.0:
                    continue
                tokens += count * qa * len(answer)
                for j in range(len(answer)):
                    reach = sum(w for b, w in q.items() if len(b) > j and b[:j] == answer[:j])
                    hit = sum(w for b, w in q.items() if len(b) > j and b[: j + 1] == answer[: j + 1])
                    loss -= count * qa * np.log(hit / reach)
        return float(loss / tokens)

    def __getitem__(self, i: int) -> Sample:
        ids, positions = self.templates[self.template_of[i]]
        rows = tuple(int(r) for r in self.image_rows[i, : self.n_images[i]])
        return Sample(tuple(ids), rows, positions, TASKS[self.task_ids[i]], int(self.answers[i]))
