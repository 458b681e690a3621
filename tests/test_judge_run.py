"""``judge()`` end to end with fake metrics on generated sample trees: outputs and their schemas, incremental
re-runs that compute only new images, one decode per image, unavailable metrics, the overlap warning, copies."""

from __future__ import annotations

import collections
import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tastelab.judge
from judge_fakes import (
    fake_config,
    fake_encoder_loader,
    make_kohya,
    make_references,
    make_subfolders,
    registered_fakes,
)
from tastelab.io import images as images_io
from tastelab.judge.run import SCORE_COLUMNS, judge

LEADERBOARD_HEAD = ["checkpoint", "rank", "composite", "composite_low", "composite_high", "tied_with_best", "flags"]


@pytest.fixture
def fake_metrics() -> Iterator[collections.Counter[str]]:
    yield from registered_fakes()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    samples = tmp_path / "samples"
    make_subfolders(samples, [1, 2, 3])
    refs = tmp_path / "refs"
    make_references(refs)
    return {"samples": samples, "refs": refs, "out": tmp_path / "out"}


def test_end_to_end_outputs_and_schemas(tree: dict[str, Path], fake_metrics) -> None:
    result = judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], progress=False)
    assert tastelab.judge.judge is judge
    assert result.layout == "subfolders" and len(result.images) == 12
    assert [r["checkpoint"] for r in result.checkpoints] == ["lora-000001", "lora-000002", "lora-000003"]
    assert [r["epoch"] for r in result.checkpoints] == [1, 2, 3]
    board = result.leaderboard
    assert board.rows[0].checkpoint == "lora-000003"  # closest to the references by construction
    assert board.rows[0].families == ["consistency", "quality", "diversity"]
    assert result.missing_families == ["alignment", "aesthetics"]

    table = pq.read_table(tree["out"] / "scores.parquet")
    assert tuple(table.column_names) == SCORE_COLUMNS
    assert {f.name: str(f.type) for f in table.schema} == {
        "checkpoint": "string", "epoch": "int64", "step": "int64", "image": "string", "prompt_idx": "int64",
        "prompt": "string", "seed": "int64", "metric": "string", "value": "double"}
    rows = table.to_pylist()
    per_metric = collections.Counter(r["metric"] for r in rows)
    assert per_metric == {"fake_ref_sim": 12, "fake_bright": 12, "fake_copy": 12, "fake_spread": 3}
    assert all(r["image"] is None for r in rows if r["metric"] == "fake_spread")  # set rows have no image

    records = json.loads((tree["out"] / "leaderboard.json").read_text())
    assert [r["checkpoint"] for r in records] == [r.checkpoint for r in board.rows]
    assert list(records[0])[:7] == LEADERBOARD_HEAD
    for column in ("consistency", "quality", "diversity", "alignment", "fake_ref_sim", "fake_bright", "fake_spread",
                   "fake_copy", "epoch", "step"):
        assert column in records[0], column
    csv_head = (tree["out"] / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert csv_head[:7] == LEADERBOARD_HEAD and len((tree["out"] / "leaderboard.csv").read_text().splitlines()) == 4
    html = (tree["out"] / "report.html").read_text()
    assert "lora-000003" in html and "data:image/jpeg;base64," in html and "<svg" in html
    assert len(result.thumbnails) == 3 + 3  # only what the report shows: first seed per group, the references
    assert (tree["out"] / ".judge_cache.sqlite").is_file()
    assert not list(tree["out"].glob(".*.tmp-*"))  # atomic writes leave no temporary files


def test_kohya_layout_with_prompts(tmp_path: Path, fake_metrics) -> None:
    prompts = make_kohya(tmp_path / "run", [2, 4])
    make_references(tmp_path / "refs")
    result = judge(tmp_path / "run", references=tmp_path / "refs", prompts=prompts, config=fake_config(),
                   progress=False)
    assert result.layout == "kohya"
    assert [r["checkpoint"] for r in result.checkpoints] == ["lora-000002", "lora-000004"]
    spread = [r for r in result.scores if r["metric"] == "fake_spread"]
    assert sorted((r["checkpoint"], r["prompt_idx"]) for r in spread) == [
        ("lora-000002", 0), ("lora-000002", 1), ("lora-000004", 0), ("lora-000004", 1)]
    image_rows = [r for r in result.scores if r["metric"] == "fake_bright"]
    assert {r["seed"] for r in image_rows} == {100, 101}
    assert image_rows[0]["prompt"].startswith("photo of sks dog, pose 0")
    assert result.leaderboard.rows[0].checkpoint == "lora-000004"


def test_a_new_epoch_computes_only_its_images(tree: dict[str, Path], fake_metrics) -> None:
    judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], progress=False)
    assert fake_metrics["fake_bright"] == 12 and fake_metrics["fake_spread"] == 3
    fake_metrics.clear()
    make_subfolders(tree["samples"], [4])  # the trainer saved another epoch
    again = judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], progress=False)
    assert fake_metrics == {"fake_ref_sim": 4, "fake_bright": 4, "fake_copy": 4, "fake_spread": 1}
    bright = next(m for m in again.metrics if m.name == "fake_bright")
    assert (bright.computed, bright.cached) == (4, 12)
    assert len(again.checkpoints) == 4 and again.leaderboard.rows[0].checkpoint == "lora-000004"
    # a renamed folder is the same content: nothing is recomputed; the values are those of the first run
    fake_metrics.clear()
    shutil.move(tree["samples"] / "lora-000001", tree["samples"] / "lora-000009")
    judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], progress=False)
    assert sum(fake_metrics.values()) == 0
    # changing one metric's option recomputes that metric only
    changed = fake_config(metrics={"fake_bright": {"options": {"scale": 2.0}}})
    judge(tree["samples"], references=tree["refs"], config=changed, out=tree["out"], progress=False)
    assert fake_metrics == {"fake_bright": 16}


def test_shared_cache_file(tree: dict[str, Path], tmp_path: Path, fake_metrics) -> None:
    shared = tmp_path / "cache" / "judge.sqlite"
    judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], cache=shared,
          progress=False)
    fake_metrics.clear()
    judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tmp_path / "elsewhere", cache=shared,
          progress=False)
    assert sum(fake_metrics.values()) == 0 and shared.is_file()
    assert not (tmp_path / "elsewhere" / ".judge_cache.sqlite").exists()


def test_each_image_is_decoded_once_per_run(tree: dict[str, Path], fake_metrics, monkeypatch) -> None:
    decoded: collections.Counter[str] = collections.Counter()
    real = images_io.load_image

    def counting(source, *args, **kwargs):
        decoded[str(source)] += 1
        return real(source, *args, **kwargs)

    monkeypatch.setattr(images_io, "load_image", counting)
    # chunks of 3 images: groups of 2 seeds are never split, so the set metric reuses the chunk's pixels
    result = judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], chunk_size=3,
                   progress=False)
    assert len(result.images) == 12
    assert max(decoded.values()) == 1 and len(decoded) == 12 + 3  # every sample and reference exactly once
    assert fake_metrics["fake_spread"] == 3 and fake_metrics["fake_bright"] == 12  # no group split, none twice
    decoded.clear()
    judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], progress=False)
    assert max(decoded.values(), default=0) == 1  # all cached: only what the report shows is decoded, once


def test_an_unavailable_metric_warns_and_its_family_is_reweighted(tree: dict[str, Path], fake_metrics,
                                                                  caplog) -> None:
    result = judge(tree["samples"], references=tree["refs"], config=fake_config(vlm=True), progress=False)
    vlm = next(m for m in result.metrics if m.name == "fake_vlm")
    assert vlm.status == "unavailable" and "huggingface-cli download" in vlm.reason
    said = [w for w in result.warnings if "fake_vlm" in w]
    assert len(said) == 1 and "unavailable" in said[0] and "huggingface-cli download" in said[0]
    assert "fake_vlm" in caplog.text
    assert "alignment" in result.missing_families
    assert all("alignment" not in r.families for r in result.leaderboard.rows)
    assert {m.name for m in result.metrics if m.status == "ran"} == {"fake_ref_sim", "fake_bright", "fake_spread",
                                                                      "fake_copy"}


def test_references_overlapping_training_images_warn(tree: dict[str, Path], tmp_path: Path, fake_metrics) -> None:
    train = tmp_path / "train"
    train.mkdir()
    shutil.copy(tree["refs"] / "ref_1.png", train / "img_0042.png")  # same content, another name
    result = judge(tree["samples"], references=tree["refs"], train_images=train, config=fake_config(),
                   progress=False)
    overlap = [w for w in result.warnings if "also training images" in w]
    assert len(overlap) == 1 and "ref_1.png" in overlap[0] and "overstate" in overlap[0]
    clean = judge(tree["samples"], references=tree["refs"], config=fake_config(), progress=False)
    assert not [w for w in clean.warnings if "also training images" in w]


def test_copies_are_flagged_with_their_nearest_reference(tree: dict[str, Path], fake_metrics) -> None:
    over = tree["samples"] / "lora-000003"
    for p in (0, 1):  # the over-trained epoch reproduces reference photos
        shutil.copy(tree["refs"] / f"ref_{p}.png", over / f"p{p}_s0.png")
    result = judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], progress=False)
    row = result.leaderboard.row("lora-000003")
    assert row.copy_share == 0.5 and "copies_references" in row.flags
    assert all("copies_references" not in r.flags for r in result.leaderboard.rows if r is not row)
    assert sorted((c.image.path.name, c.nearest.path.name) for c in result.copies) == [
        ("p0_s0.png", "ref_0.png"), ("p1_s0.png", "ref_1.png")]
    html = (tree["out"] / "report.html").read_text()
    assert "copies_references" in html and "nearest: ref_0.png" in html


def test_a_metric_returning_nan_is_a_bug_not_a_score(tree: dict[str, Path], fake_metrics) -> None:
    with pytest.raises(RuntimeError, match="fake_nan returned nan"):
        judge(tree["samples"], references=tree["refs"], config=fake_config(nan=True), out=tree["out"],
              progress=False)
    assert not (tree["out"] / "leaderboard.json").exists()


def test_an_undecodable_sample_is_left_out_with_a_warning(tree: dict[str, Path], fake_metrics) -> None:
    (tree["samples"] / "lora-000002" / "p1_s1.png").write_bytes(b"not a png")
    result = judge(tree["samples"], references=tree["refs"], config=fake_config(), progress=False)
    assert len(result.images) == 11 and [p.name for p, _ in result.skipped] == ["p1_s1.png"]
    assert any("p1_s1.png" in w and "left out" in w for w in result.warnings)
    assert all(r["image"] is None or not r["image"].endswith("lora-000002/p1_s1.png") for r in result.scores)


def test_a_config_metric_without_a_plugin_is_a_user_error(tree: dict[str, Path], fake_metrics) -> None:
    from tastelab.core.errors import UserError

    cfg = fake_config(metrics={"my_score": {"family": "quality", "normalisation": {"kind": "fixed", "lo": 0,
                                                                                   "hi": 1}}})
    with pytest.raises(UserError, match="'my_score' has no plugin registered"):
        judge(tree["samples"], references=tree["refs"], config=cfg, progress=False)


def test_one_encoder_pass_serves_every_metric_and_stand_ins_are_labelled(tree: dict[str, Path],
                                                                          fake_metrics) -> None:
    shared = {"options": {"encoder": "fake:dino"}}
    cfg = fake_config(metrics={"fake_ref_sim": shared, "fake_copy": shared})
    result = judge(tree["samples"], references=tree["refs"], config=cfg, out=tree["out"], progress=False,
                   encoder_loader=fake_encoder_loader)
    assert fake_metrics["embed:fake:dino"] == 12 + 3  # each sample and reference once, for two metrics
    assert [(e.spec, e.stand_in) for e in result.encoders] == [("fake:dino", True)]
    ref_sim = next(m for m in result.metrics if m.name == "fake_ref_sim")
    assert ref_sim.resolved == {"encoder": "16x16 grey pixels (test stand-in for fake:dino)"}
    # the range the metric gives for what it resolved to replaces the registry default the config kept ...
    assert ref_sim.normalisation == (-0.5, 1.0) and ref_sim.normalisation_source == "metric (resolved)"
    norm = result.config.metrics["fake_ref_sim"].normalisation
    assert (norm.lo, norm.hi) == (-0.5, 1.0)
    html = (tree["out"] / "report.html").read_text()
    assert "offline stand-in" in html and "test stand-in for fake:dino" in html
    # ... but a range the user set wins
    own = {"options": {"encoder": "fake:dino"}, "normalisation": {"kind": "calibrated", "lo": 0.1, "hi": 0.7}}
    again = judge(tree["samples"], references=tree["refs"], config=fake_config(metrics={"fake_ref_sim": own}),
                  progress=False, encoder_loader=fake_encoder_loader)
    ref_sim = next(m for m in again.metrics if m.name == "fake_ref_sim")
    assert ref_sim.normalisation == (0.1, 0.7) and ref_sim.normalisation_source == "config"


def test_a_level_that_contradicts_the_metric_is_a_user_error(tree: dict[str, Path], fake_metrics) -> None:
    from tastelab.core.errors import UserError

    cfg = fake_config(metrics={"fake_spread": {"level": "image"}})
    with pytest.raises(UserError, match=r"metrics\.fake_spread\.level is 'image'"):
        judge(tree["samples"], references=tree["refs"], config=cfg, progress=False)


def test_no_metric_able_to_run_is_a_user_error(tree: dict[str, Path], fake_metrics) -> None:
    from tastelab.core.errors import UserError

    off = {name: {"enabled": False} for name in ("fake_ref_sim", "fake_bright", "fake_spread", "fake_copy")}
    with pytest.raises(UserError, match=r"no judge metric can run here.*fake_vlm"):
        judge(tree["samples"], references=tree["refs"], config=fake_config(vlm=True, metrics=off), out=tree["out"],
              progress=False)
    assert not (tree["out"] / "leaderboard.json").exists()


def test_samples_given_in_any_order_are_grouped_before_chunking(tmp_path: Path, fake_metrics) -> None:
    from tastelab.judge.samples import discover_samples

    prompts = make_kohya(tmp_path / "run", [1, 2], seeds=3)
    make_references(tmp_path / "refs")
    found = discover_samples(tmp_path / "run")
    shuffled = sorted(found, key=lambda s: (s.seed, s.path.name))  # seeds first: groups interleaved
    result = judge(shuffled, references=tmp_path / "refs", prompts=prompts, config=fake_config(), chunk_size=2,
                   progress=False)
    assert {r["prompt"].split(",")[0] for r in result.scores} == {"photo of sks dog"}  # prompts attached
    assert fake_metrics["fake_spread"] == 4  # 2 checkpoints x 2 prompts, each computed once on its 3 seeds
    assert all(r["value"] is not None for r in result.scores if r["metric"] == "fake_spread")


def test_the_recommended_checkpoint_passes_over_a_copying_top_rank(tree: dict[str, Path], fake_metrics) -> None:
    over = tree["samples"] / "lora-000003"
    for p in (0, 1):  # the over-trained epoch reproduces reference photos and ranks first
        shutil.copy(tree["refs"] / f"ref_{p}.png", over / f"p{p}_s0.png")
    result = judge(tree["samples"], references=tree["refs"], config=fake_config(), out=tree["out"], progress=False)
    assert result.leaderboard.rows[0].checkpoint == "lora-000003"  # the rank stays the composite's
    assert result.recommended == "lora-000002"
    records = {r["checkpoint"]: r for r in json.loads((tree["out"] / "leaderboard.json").read_text())}
    assert [c for c, r in records.items() if r["recommended"]] == ["lora-000002"]
    with (tree["out"] / "leaderboard.csv").open(newline="") as f:
        assert {r["checkpoint"]: r["recommended"] for r in csv.DictReader(f)}["lora-000002"] == "True"
    html = (tree["out"] / "report.html").read_text()
    assert "Recommended: lora-000002</b> (rank 2)" in html
    assert "Passed over: lora-000003 (rank 1: copies_references)" in html
    assert '<tr class="pick" data-checkpoint="lora-000002">' in html
    top = judge(tree["samples"], references=tree["refs"], config=fake_config(recommend={"disqualifying_flags": []}),
                progress=False)
    assert top.recommended == "lora-000003"
