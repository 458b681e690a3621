"""Votes split by image (issue 14, honest evaluation): held-out images never appear in a training vote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tastelab.io.records import RecordError
from tastelab.io.splits import (
    SEEN_SPLIT,
    held_out_rank,
    save_split,
    split_comparisons,
    split_votes,
    split_votes_by_image,
)
from tastelab.io.votes import Vote
from tastelab.training.config import ConfigError, load_train_config

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _votes(n_images: int = 40, n_votes: int = 600, seed: int = 0, root: str = "/photos") -> list[Vote]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_votes):
        a, b = rng.choice(n_images, 2, replace=False)
        va = int(rng.integers(0, 3))
        out.append(Vote(f"{root}/img{a:03d}.jpg", f"{root}/img{b:03d}.jpg", va, 2 - va))
    return out


def _images_of(votes: list[Vote]) -> set[str]:
    return {c.image_a for c in votes} | {c.image_b for c in votes}


def _image_owner(votes: dict[str, list[Vote]]) -> dict[str, str]:
    """Recover an image's split as the least held-out split any of its votes is in (train < val < test)."""
    owner: dict[str, str] = {}
    for name in sorted(votes, key=held_out_rank, reverse=True):
        for image in _images_of(votes[name]):
            owner[image] = name
    return owner


def _leaks(votes: dict[str, list[Vote]], held_out: set[str]) -> list[Vote]:
    """Training votes (train and the seen-pairs split) that touch a held-out image."""
    return [c for name in ("train", SEEN_SPLIT) for c in votes.get(name, [])
            if c.image_a in held_out or c.image_b in held_out]


def test_no_val_or_test_image_is_in_any_training_vote() -> None:
    votes = _votes()
    split = split_votes_by_image(votes, FRACTIONS, seed=1)
    assert split.pair_split == "image" and split.images is not None
    held_out = set(split.images["val"]) | set(split.images["test"])
    assert held_out and not _leaks(split.votes, held_out)
    assert sorted(map(repr, (c for cs in split.votes.values() for c in cs))) == sorted(map(repr, votes))
    # The per-pair protocol this replaces leaks: nearly every held-out pair's images also train.
    by_pair = split_comparisons(votes, FRACTIONS, seed=1)
    pair_held_out = _images_of(by_pair["val"]) | _images_of(by_pair["test"])
    assert _leaks(by_pair, pair_held_out)


def test_a_vote_goes_to_its_most_held_out_image_split() -> None:
    """train < val < test: a train/val vote is val, a train/test or val/test vote is test."""
    assert sorted(["test", "train", "val", "other"], key=held_out_rank) == ["train", "val", "other", "test"]
    votes = _votes(seed=3)
    split = split_votes_by_image(votes, FRACTIONS, seed=2, seen_fraction=0.0)
    assert split.images is not None
    owner = {p: name for name, ps in split.images.items() for p in ps}
    kinds: set[tuple[str, str]] = set()
    for name, cs in split.votes.items():
        for c in cs:
            sides = sorted((owner[c.image_a], owner[c.image_b]), key=held_out_rank)
            assert name == sides[1], (c, sides, name)
            kinds.add((sides[0], sides[1]))
    assert {("val", "test"), ("train", "test"), ("train", "val"), ("train", "train")} <= kinds
    assert SEEN_SPLIT not in split.votes  # fraction 0: no seen-pairs split


def test_seen_pairs_are_whole_pairs_among_training_images() -> None:
    votes = _votes(n_images=30, n_votes=500)
    votes += [Vote(c.image_b, c.image_a, c.votes_b, c.votes_a) for c in votes[:100]]  # same pairs, flipped
    split = split_votes_by_image(votes, FRACTIONS, seed=0, seen_fraction=0.25)
    assert split.images is not None
    train_images = set(split.images["train"])
    seen = split.votes[SEEN_SPLIT]
    assert seen and _images_of(seen) <= train_images
    pairs = {name: {frozenset((c.image_a, c.image_b)) for c in cs} for name, cs in split.votes.items()}
    assert not pairs[SEEN_SPLIT] & pairs["train"]
    share = len(pairs[SEEN_SPLIT]) / (len(pairs[SEEN_SPLIT]) + len(pairs["train"]))
    assert share == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match="seen-pairs fraction"):
        split_votes_by_image(votes, FRACTIONS, seen_fraction=1.0)


def test_image_split_is_deterministic_and_order_free() -> None:
    votes = _votes()
    a = split_votes_by_image(votes, FRACTIONS, seed=5)
    b = split_votes_by_image(list(reversed(votes)), FRACTIONS, seed=5)
    c = split_votes_by_image(votes, FRACTIONS, seed=6)
    assert a.images == b.images and a.images != c.images
    assert {k: sorted(map(repr, v)) for k, v in a.votes.items()} == \
        {k: sorted(map(repr, v)) for k, v in b.votes.items()}


def test_split_file_persists_portable_keys_and_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    votes = _votes(root="/disk1/photos")
    first = split_votes(votes, path, fractions=FRACTIONS, seed=4)
    payload = json.loads(path.read_text())
    assert payload["kind"] == "pairs" and payload["pair_split"] == "image" and payload["seen_fraction"] == 0.1
    assert set(payload["splits"]) == {"train", "val", "test", SEEN_SPLIT}
    assert all("\t" in k and "/" not in k for keys in payload["splits"].values() for k in keys)
    assert all(k.startswith("img") for keys in payload["images"].values() for k in keys)
    # Moved to another disk, and asked with another seed: the saved split wins, images included.
    moved = [Vote(c.image_a.replace("/disk1", "/disk2"), c.image_b.replace("/disk1", "/disk2"), c.votes_a,
                  c.votes_b) for c in votes]
    again = split_votes(moved, path, fractions=FRACTIONS, seed=99)
    assert again.pair_split == "image" and again.images is not None and first.images is not None
    assert {k: [p.replace("/disk2", "/disk1") for p in v] for k, v in again.images.items()} == first.images
    assert {k: len(v) for k, v in again.votes.items()} == {k: len(v) for k, v in first.votes.items()}
    # A vote on a pair the file does not know is an error naming the file, not a silent re-split.
    with pytest.raises(RecordError, match=r"split\.json.*not in the saved split"):
        split_votes([*votes, Vote("/disk1/photos/img000.jpg", "/disk1/photos/new.jpg", 1, 0)], path)


def test_an_edited_image_split_file_that_leaks_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    split_votes(_votes(), path, fractions=FRACTIONS, seed=0)
    payload = json.loads(path.read_text())
    payload["splits"]["train"].append(payload["splits"]["test"].pop())  # a test-image pair moved into train
    path.write_text(json.dumps(payload))
    with pytest.raises(RecordError, match=r"split\.json.*is in split 'train' but its images"):
        split_votes(_votes(), path)


def test_old_per_pair_split_files_still_load(tmp_path: Path) -> None:
    """A split.json written before pair_split existed (kind pairs, no pair_split) is a per-pair split."""
    votes = _votes(n_images=12, n_votes=80)
    old = split_comparisons(votes, FRACTIONS, seed=0)
    key = {c: "\t".join(sorted((Path(c.image_a).name, Path(c.image_b).name))) for c in votes}
    path = tmp_path / "old" / "split.json"
    save_split(path, {name: sorted({key[c] for c in cs}) for name, cs in old.items()},
               {"seed": 0, "fractions": FRACTIONS, "kind": "pairs"})
    loaded = split_votes(votes, path, pair_split="pair")
    assert loaded.pair_split == "pair" and loaded.images is None
    assert {k: sorted(map(repr, v)) for k, v in loaded.votes.items()} == \
        {k: sorted(map(repr, v)) for k, v in old.items()}
    with pytest.raises(RecordError, match=r"old/split\.json.*holds out pairs.*data\.pair_split 'image'"):
        split_votes(votes, path, pair_split="image")
    image_file = tmp_path / "new" / "split.json"
    split_votes(votes, image_file)
    with pytest.raises(RecordError, match=r"new/split\.json.*holds out images.*data\.pair_split 'pair'"):
        split_votes(votes, image_file, pair_split="pair")


def test_pair_split_config_option() -> None:
    def load(*overrides: str):  # a fresh mapping each time: --set writes into the nested dicts
        raw = {"data": {"format": "pairs", "path": "votes.csv"},
               "model": {"name": "m", "head": {"kind": "score"},
                         "backbone": {"kind": "torchvision", "name": "mobilenet_v2"}}}
        return load_train_config(raw=raw, overrides=list(overrides))

    cfg = load()
    assert cfg.data.pair_split == "image" and cfg.data.seen_pairs is None
    assert load("data.pair_split=pair").data.pair_split == "pair"
    assert load("data.seen_pairs=0.2").data.seen_pairs == 0.2
    with pytest.raises(ConfigError, match=r"data\.pair_split"):
        load("data.pair_split=images")
    with pytest.raises(ConfigError, match=r"data\.seen_pairs applies"):
        load("data.pair_split=pair", "data.seen_pairs=0.2")
    with pytest.raises(ConfigError, match="seen_pairs"):
        load("data.seen_pairs=1.5")


@pytest.mark.parametrize(("pair_split", "split", "label"), [
    ("image", "test", "image split: votes touching unseen images"),
    ("image", SEEN_SPLIT, "image split: new pairs among seen (training) images"),
    ("pair", "test", "per-pair split: held-out pairs, mostly among images seen in training"),
])
def test_analyze_says_which_kind_of_held_out_votes_it_scored(tmp_path: Path, capsys, pair_split: str, split: str,
                                                              label: str) -> None:
    from tastelab.cli.main import main
    from tastelab.evaluation.analysis import analyze_votes
    from tastelab.io.votes import load_votes
    from tastelab.io.writers import open_writer

    votes = _votes(n_images=20, n_votes=200, root=str(tmp_path))
    path = tmp_path / "votes.csv"
    path.write_text("image_a,image_b,votes_a,votes_b\n" + "".join(
        f"{Path(c.image_a).name},{Path(c.image_b).name},{c.votes_a},{c.votes_b}\n" for c in votes))
    split_file = tmp_path / "run" / "split.json"
    split_votes(load_votes(path, check_files=False)[0], split_file, pair_split=pair_split, fractions=FRACTIONS)
    pred = tmp_path / "pred.jsonl"
    with open_writer(pred, resume=False) as writer:
        for i in range(20):
            writer.write({"path": str(tmp_path / f"img{i:03d}.jpg"), "raw_score": float(i), "distribution": None,
                          "uncertainty": None, "error": None, "band": None})
    assert analyze_votes(path, pred, split=split, split_file=split_file).truth["pair_split"] == pair_split
    assert main(["analyze", "--truth", str(path), "--pred", str(pred), "--split", split,
                 "--split-file", str(split_file)]) == 0
    assert f"(split {split}; {label})" in " ".join(capsys.readouterr().out.split())
