"""Text inputs from strangers (io/textfiles.py): a FIFO never blocks a reader, bytes that are not UTF-8 are one
line naming the file (and line), and the CLI turns both into one error line with exit code 2."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tastelab.cli.main import main
from tastelab.evaluation.analysis import load_score_table
from tastelab.io.boxes import load_coco_boxes, load_yolo_boxes
from tastelab.io.keypoints import load_coco_keypoints
from tastelab.io.records import load_records
from tastelab.io.textfiles import TextFileError, read_text_file
from tastelab.io.votes import VotesLog, load_votes, read_vote_table
from tastelab.judge.config import load_judge_config
from tastelab.training.config import read_recipe
from tastelab.tuning.space import load_space
from tastelab.web.session import _check_score_file

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


def _returns_quickly(call: Callable[[], Any], fifo: Path, seconds: float = 5.0) -> BaseException | None:
    """Run ``call`` in a thread; the exception it raised. Fails the test when it is still blocked on ``fifo``
    after ``seconds`` (the old readers' ``open()`` waited for a writer forever), then releases it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a reader is waiting: this open succeeds and EOF frees it
        os.close(fd)
        thread.join(seconds)
        pytest.fail(f"reading {fifo.name} blocked on a FIFO")
    return outcome[0]


READERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "mos table": ("labels.csv", lambda p: load_records(p, format="mos")),
    "ava": ("AVA.txt", lambda p: load_records(p, format="ava")),
    "personal json": ("scores.json", lambda p: load_records(p, format="personal")),
    "votes": ("votes.csv", load_votes),
    "recipe": ("recipe.yaml", read_recipe),
    "search space": ("space.yaml", load_space),
    "judge config": ("judge.yaml", load_judge_config),
    "score output": ("scores.jsonl", load_score_table),
    "label app score file": ("tastelab_scores.json", _check_score_file),
    "coco boxes": ("instances.json", load_coco_boxes),
    "coco keypoints": ("person_keypoints.json", load_coco_keypoints),
    "yolo data.yaml": ("data.yaml", load_yolo_boxes),
}


@needs_fifo
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, reader: str) -> None:
    name, read = READERS[reader]
    fifo = tmp_path / name
    os.mkfifo(fifo)  # no writer: a plain open() for reading waits forever
    exc = _returns_quickly(lambda: read(fifo), fifo)
    assert isinstance(exc, ValueError), exc  # UserError / RecordError: one line in the CLI
    assert "not a regular file" in str(exc) and "FIFO" in str(exc) and name in str(exc)


@needs_fifo
@pytest.mark.parametrize("argv", [["train", "{fifo}"], ["ratings", "{fifo}"],
                                  ["analyze", "--truth", "{dir}/ok.csv", "--pred", "{fifo}"]],
                         ids=["train", "ratings", "analyze"])
def test_cli_fifo_input_is_one_line_exit_2(tmp_path: Path, argv: list[str], caplog) -> None:
    suffix = ".jsonl" if argv[0] == "analyze" else ".yaml" if argv[0] == "train" else ".csv"
    fifo = tmp_path / f"input{suffix}"
    os.mkfifo(fifo)
    (tmp_path / "ok.csv").write_text("path,mos\na.jpg,0.5\n")
    args = [a.format(fifo=fifo, dir=tmp_path) for a in argv]
    codes: list[int] = []
    with caplog.at_level(logging.ERROR, logger="tastelab"):
        assert _returns_quickly(lambda: codes.append(main(args)), fifo) is None
    assert codes == [2]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and str(fifo) in errors[0] and "FIFO" in errors[0]


@needs_fifo
def test_a_fifo_named_as_an_image_by_box_labels_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "a.jpg"
    os.mkfifo(fifo)  # the reader opens each image's header for its size
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    exc = _returns_quickly(lambda: load_coco_boxes(tmp_path / "instances.json"), fifo)
    assert isinstance(exc, ValueError) and "a.jpg" in str(exc) and "not a regular file" in str(exc), exc


def test_label_table_with_bytes_that_are_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_bytes(b"path,mos\na.jpg,0.1\nb\xff.jpg,0.2\n")
    with pytest.raises(ValueError, match=r"labels\.csv:3: not UTF-8 text \(byte 0xff\)"):
        load_records(table, format="mos", check_files=False)


def test_recipe_with_bytes_that_are_not_utf8_is_one_line_exit_2(tmp_path: Path, caplog) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"seed: 0\nname: caf\xe9\n")
    with caplog.at_level(logging.ERROR, logger="tastelab"):
        assert main(["train", str(recipe)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"{recipe}:2: not UTF-8 text (byte 0xe9)"]


def test_a_vote_line_that_is_not_utf8_damages_only_itself_and_survives_a_rewrite(tmp_path: Path) -> None:
    votes = tmp_path / "votes.csv"
    damaged = b"x\xff.jpg,b.jpg,1,0"
    votes.write_bytes(b"image_a,image_b,votes_a,votes_b\na.jpg,b.jpg,1,0\n" + damaged + b"\nb.jpg,c.jpg,0,1\n")
    table = read_vote_table(votes)
    assert [(ln.line, ln.vote is not None, ln.problem) for ln in table.lines] == [
        (2, True, None), (3, False, "not UTF-8 text"), (4, True, None)]
    _, problems = load_votes(votes, check_files=False, strict=False)
    assert [(p.line, p.message) for p in problems] == [(3, "not UTF-8 text")]
    log = VotesLog(votes)  # the labelling app's file: the damaged line is kept as it is, byte for byte
    log.append("a.jpg", "c.jpg", 1, 0)
    log.pop()  # undo: the whole file is rewritten
    assert damaged + b"\n" in votes.read_bytes()


def test_read_text_file_reasons(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt"):  # as open() says it: callers word it
        read_text_file(tmp_path / "nowhere.txt")
    with pytest.raises(TextFileError, match="not a regular file"):
        read_text_file(tmp_path)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert read_text_file(tmp_path / "bom.txt") == "hello"


@needs_fifo
def test_a_file_url_to_a_fifo_is_an_error_without_blocking(tmp_path: Path) -> None:
    """--allow-urls fetches file:// inputs too; urlopen waited forever on a FIFO (a path list from a stranger)."""
    from tastelab.io.images import ImageDecodeError
    from tastelab.io.urls import fetch_url

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    exc = _returns_quickly(lambda: fetch_url(fifo.as_uri()), fifo)
    assert isinstance(exc, ImageDecodeError) and exc.path == fifo.as_uri(), exc
    assert exc.reason.startswith("cannot fetch URL: not a regular file (a FIFO")


BOMB = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10) if i else '1, 1, 1, 1, 1, 1, 1, 1, 1, 1'}]\n"
               for i in range(9))  # nine lines, 10^9 values once the aliases are expanded


@pytest.mark.parametrize("reader", ["recipe", "search space", "judge config"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path, reader: str) -> None:
    """A stranger's YAML parses into shared references that stand for 10^9 values; the first walk over it
    (validation, a JSON dump, a hash) ran out of memory. It is refused when read, naming the file."""
    name, read = READERS[reader]
    path = tmp_path / name
    path.write_text(BOMB)
    with pytest.raises(ValueError, match=rf"{name}: invalid YAML: .*aliases expand to more than 1,000,000 values"):
        read(path)


def test_yaml_anchors_of_a_normal_size_still_load(tmp_path: Path) -> None:
    from tastelab.io.textfiles import load_yaml

    assert load_yaml("base: &b {lr: 0.1}\nrun: *b\n") == {"base": {"lr": 0.1}, "run": {"lr": 0.1}}
