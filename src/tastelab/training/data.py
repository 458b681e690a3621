"""Training datasets: cached features (fast path) or images, with targets and seeded augmentation.

Every random choice (sample order, flips, cached view) is a pure function of ``(seed, epoch, index)``
rather than of a global RNG stream. That is what makes resume exact: a run restarted mid-epoch
replays the same batches with the same augmentations as a run that never stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from tastelab.io.images import PreprocessConfig, load_and_preprocess
from tastelab.io.records import Record, RecordSet, detect_format, load_records
from tastelab.io.registries import LABEL_FORMATS, reader_options
from tastelab.training.config import TrainConfig

#: data.* recipe fields that are label-format reader options (LABEL_FORMATS metadata "options").
_FORMAT_OPTION_FIELDS = ("image_root", "path_column", "score_column", "score_range", "ava_train_list",
                         "ava_test_list")


def load_dataset_records(cfg: TrainConfig) -> RecordSet:
    """The labelled records a recipe's ``data.*`` section names (format detected, reader options applied)."""
    d = cfg.data
    fmt = detect_format(d.path) if d.format == "auto" else d.format
    options = LABEL_FORMATS.metadata(fmt).get("options", {})  # reader keyword -> data.* field
    kwargs = reader_options(LABEL_FORMATS, fmt, d)
    unused = [key for key in _FORMAT_OPTION_FIELDS if getattr(d, key) is not None and key not in options.values()]
    if unused:
        raise ValueError(f"{d.path}: data.{', data.'.join(unused)} does not apply to label format {fmt!r}")
    rs = load_records(d.path, format=fmt, **kwargs)
    if d.limit is not None:
        rs.records = rs.records[: d.limit]
    if not rs.records:
        raise ValueError(f"{d.path}: no usable records")
    return rs


def seeded_unit(seed: int, epoch: int, index: int, salt: str = "") -> float:
    """A deterministic pseudo-random number in [0, 1) for one sample in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class Targets:
    """Labels aligned with a dataset: native-scale score, optional distribution, per-sample weight."""

    score: torch.Tensor  # (N,)
    weight: torch.Tensor  # (N,)
    dist: torch.Tensor | None = None  # (N, K)

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> Targets:
        score = torch.tensor([float(r.score) for r in records], dtype=torch.float32)  # type: ignore[arg-type]
        weight = torch.tensor([float(r.weight) for r in records], dtype=torch.float32)
        dist = None
        if records and all(r.distribution is not None for r in records):
            dist = torch.tensor([list(r.distribution) for r in records], dtype=torch.float32)  # type: ignore[arg-type]
        return cls(score=score, weight=weight, dist=dist)

    def item(self, i: int) -> dict[str, torch.Tensor]:
        out = {"score": self.score[i], "weight": self.weight[i]}
        if self.dist is not None:
            out["dist"] = self.dist[i]
        return out


class EpochSampler(Sampler[int]):
    """A fresh seeded permutation per epoch; with several processes each takes its own stride."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.rank::self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class FeatureDataset(Dataset):
    """Cached features; training picks one cached view per sample per epoch (e.g. original or flip)."""

    def __init__(self, views: dict[str, torch.Tensor], targets: Targets, *, seed: int = 0,
                 train: bool = True) -> None:
        self.views = views
        self.names = sorted(views)
        self.targets = targets
        self.seed = seed
        self.train = train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets.score)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        name = "orig"
        if self.train and len(self.names) > 1:
            name = self.names[int(seeded_unit(self.seed, self.epoch, i, "view") * len(self.names))]
        return {"features": self.views[name][i], "index": torch.tensor(i), **self.targets.item(i)}


class ImageDataset(Dataset):
    """Decoded images at the current curriculum size; failed decodes are reported by the trainer."""

    def __init__(self, paths: Sequence[str], targets: Targets, preprocess: PreprocessConfig, *,
                 seed: int = 0, train: bool = True, hflip: bool = True) -> None:
        self.paths = list(paths)
        self.targets = targets
        self.preprocess = preprocess
        self.seed = seed
        self.train = train
        self.hflip = hflip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_size(self, size: int) -> None:
        self.preprocess = self.preprocess.model_copy(update={"size": size})

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pixels = load_and_preprocess(self.paths[i], self.preprocess)
        if self.train and self.hflip and seeded_unit(self.seed, self.epoch, i, "hflip") < 0.5:
            pixels = pixels.flip(-1).contiguous()
        return {"pixels": pixels, "index": torch.tensor(i), **self.targets.item(i)}


@dataclass
class PairTargets:
    """Pairwise labels: indexes into an image table, the soft preference for A, and a weight."""

    idx_a: torch.Tensor  # (P,) long
    idx_b: torch.Tensor  # (P,) long
    votes_a: torch.Tensor  # (P,)
    votes_b: torch.Tensor  # (P,)

    @property
    def p_a(self) -> torch.Tensor:
        """Share of votes for A (a tie is 0.5): the Bradley-Terry / RankNet target."""
        return self.votes_a / (self.votes_a + self.votes_b).clamp_min(1e-9)

    @property
    def weight(self) -> torch.Tensor:
        """Pairs with more votes count more (the loss is an average over votes, not pairs)."""
        return self.votes_a + self.votes_b

    def item(self, i: int) -> dict[str, torch.Tensor]:
        return {"p_a": self.p_a[i], "weight": self.weight[i], "pref": torch.sign(self.votes_a[i] - self.votes_b[i])}


class PairFeatureDataset(Dataset):
    """Cached features of both images of each pair (one cached view per image per epoch)."""

    def __init__(self, views: dict[str, torch.Tensor], pairs: PairTargets, *, seed: int = 0) -> None:
        self.views = views
        self.names = sorted(views)
        self.pairs = pairs
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs.idx_a)

    def _features(self, image: int) -> torch.Tensor:
        name = "orig"
        if len(self.names) > 1:
            name = self.names[int(seeded_unit(self.seed, self.epoch, image, "view") * len(self.names))]
        return self.views[name][image]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.pairs.idx_a[i]), int(self.pairs.idx_b[i])
        return {"features_a": self._features(a), "features_b": self._features(b), "index": torch.tensor(i),
                **self.pairs.item(i)}


class PairImageDataset(Dataset):
    """Both images of each pair, decoded at the current curriculum size."""

    def __init__(self, paths: Sequence[str], pairs: PairTargets, preprocess: PreprocessConfig, *,
                 seed: int = 0, hflip: bool = True) -> None:
        dummy = Targets(score=torch.zeros(len(paths)), weight=torch.ones(len(paths)))
        self.images = ImageDataset(paths, dummy, preprocess, seed=seed, hflip=hflip)
        self.pairs = pairs

    def set_epoch(self, epoch: int) -> None:
        self.images.set_epoch(epoch)

    def set_size(self, size: int) -> None:
        self.images.set_size(size)

    def __len__(self) -> int:
        return len(self.pairs.idx_a)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.pairs.idx_a[i]), int(self.pairs.idx_b[i])
        return {"pixels_a": self.images[a]["pixels"], "pixels_b": self.images[b]["pixels"],
                "index": torch.tensor(i), **self.pairs.item(i)}
