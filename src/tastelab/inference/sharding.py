"""One scoring job over N processes or machines: deterministic shards, launcher detection, merging.

Shard membership is a pure function of the path string, ``blake2b(path as UTF-8) mod N``: it does not
depend on input order, on how the inputs were expanded, on ``PYTHONHASHSEED`` or on the machine. N
independent processes given the same inputs therefore cover every path exactly once without talking
to each other, and re-running shard K (to resume it) sees the same paths again.

Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``tastelab score``
shards by process rank on its own and writes ``OUT`` with ``.rankK`` before the suffix; ``tastelab
merge`` joins the parts into one output, keeping one record per path.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tastelab.core.device import resolve_device
from tastelab.io.rows import resume_key
from tastelab.io.writers import SUPPORTED_SUFFIXES, ModelMismatchError, check_output, open_writer, read_results

logger = logging.getLogger(__name__)


def shard_of(path: str, count: int) -> int:
    """The shard (0..count-1) that ``path`` belongs to; stable across processes, machines and runs."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    # surrogateescape: undecodable file names (os.fsdecode) hash by their original bytes instead of failing.
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_paths(paths: Iterable[str], index: int, count: int) -> list[str]:
    """The paths of shard ``index`` of ``count`` (0-based), in input order."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= K < N and N >= 1")
    return [p for p in paths if shard_of(p, count) == index]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 0 <= K < N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise ValueError(f"--shard {text!r}: expected K/N with integers, e.g. 0/4") from exc
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: need 0 <= K < N (K is 0-based)")
    return k, n


# --------------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process launch (torchrun, accelerate launch, deepspeed)."""

    rank: int
    world_size: int
    local_rank: int


def distributed_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; None if alone.

    These are the variables accelerate's ``PartialState`` reads too; reading them directly needs no
    process group (scoring shards never communicate), so nothing waits on NCCL or a rendezvous.
    """
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc})") from exc
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Launch(rank, world, local)


def rank_output(out: str | os.PathLike, rank: int) -> str:
    """``scores.jsonl`` -> ``scores.rank3.jsonl`` (the suffix still selects the format)."""
    path = Path(out)
    return str(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))


def launch_device(device: str, launch: Launch | None) -> str:
    """``auto`` under a launcher means this process's own GPU (``cuda:LOCAL_RANK``), not everyone's cuda:0.

    Which device ``auto`` is otherwise, and whether a named one exists, is :func:`resolve_device`'s call.
    """
    if device != "auto" or launch is None:
        return device
    import torch

    if resolve_device("auto").type != "cuda":
        return device
    return f"cuda:{launch.local_rank % torch.cuda.device_count()}"


@dataclass(frozen=True)
class ShardPlan:
    """Which part of the inputs this process scores, where it writes, and on which device."""

    index: int | None  # None: everything
    count: int | None
    out: str | None
    device: str
    launch: Launch | None

    def select(self, paths: Sequence[str]) -> list[str]:
        return list(paths) if self.index is None else shard_paths(paths, self.index, self.count or 1)


def plan_shard(shard: str | None, out: str | None, device: str = "auto",
               environ: Mapping[str, str] | None = None) -> ShardPlan:
    """Combine ``--shard``, ``--out`` and the launcher environment into a :class:`ShardPlan`.

    An explicit ``--shard K/N`` wins and keeps ``--out`` as given (each process names its own output);
    otherwise a multi-process launch shards by rank and suffixes ``--out`` with ``.rankK``.
    """
    launch = distributed_launch(environ)
    device = launch_device(device, launch)
    if shard is not None:
        index, count = parse_shard(shard)
        if launch is not None:
            logger.warning("--shard %s given under a %d-process launch: every process scores that same shard",
                           shard, launch.world_size)
        return ShardPlan(index, count, out, device, launch)
    if launch is not None:
        rank_out = rank_output(out, launch.rank) if out else None
        return ShardPlan(launch.rank, launch.world_size, rank_out, device, launch)
    return ShardPlan(None, None, out, device, None)


# --------------------------------------------------------------------------------------------------
# Merge


@dataclass
class MergeCounts:
    """What a merge read and wrote."""

    parts: int = 0
    rows: int = 0  # records read over all parts
    paths: int = 0  # records written: one per path
    scored: int = 0
    errors: int = 0
    duplicates: int = 0  # records dropped because their path was already taken
    recovered: int = 0  # paths whose error record was replaced by a successful one
    no_path: int = 0  # records without a path (cannot be deduplicated; dropped)


def expand_parts(parts: Sequence[str]) -> list[str]:
    """Part arguments with glob patterns expanded (sorted); a pattern that matches nothing is an error."""
    out: list[str] = []
    for part in parts:
        if glob.has_magic(part) and not Path(part).exists():
            matches = sorted(glob.glob(part))
            if not matches:
                raise FileNotFoundError(f"{part}: matches no file")
            out.extend(matches)
        else:
            out.append(part)
    return out


def merge_results(out: str | os.PathLike, parts: Sequence[str | os.PathLike], *,
                  flush_every: int = 65_536, allow_mixed_models: bool = False) -> MergeCounts:
    """Join score outputs (any mix of .jsonl/.csv/.parquet) into ``out`` (format by suffix), atomically.

    One record per file (resolved path, as resume matches): the first successful record wins; an error
    record is kept only when no part has a success for that path (a shard re-run elsewhere may have
    fixed a transient failure). Parts are read twice (choose, then write) so memory holds one part plus
    the path index, not the whole job. Rows keep the model that made them; parts made by different
    models are refused (:class:`~tastelab.io.writers.ModelMismatchError`) unless ``allow_mixed_models``.
    """
    out = Path(out)
    if out.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{out}: unsupported format {out.suffix!r}; use one of {SUPPORTED_SUFFIXES}")
    check_output(out)
    part_paths = [Path(p) for p in parts]
    if not part_paths:
        raise ValueError("nothing to merge: give at least one part")
    for part in part_paths:
        if not part.is_file():
            raise FileNotFoundError(f"{part}: no such score output")
        if part.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(f"{part}: unsupported format {part.suffix!r}; use one of {SUPPORTED_SUFFIXES}")

    counts = MergeCounts(parts=len(part_paths))
    chosen: dict[str, tuple[int, int, bool]] = {}  # resume key -> (part, row, is_error)
    models: dict[tuple[str | None, str | None], Path] = {}  # (model, hash) -> first part holding it
    for pi, part in enumerate(part_paths):
        for ri, row in enumerate(read_results(part, provenance=True)):
            counts.rows += 1
            models.setdefault((row["model"], row["model_hash"]), part)
            if len(models) > 1 and not allow_mixed_models:
                (m1, p1), (m2, p2) = list(models.items())[:2]
                raise ModelMismatchError(f"{p2}: made by {_model_text(m2)}, but {p1} by {_model_text(m1)}; "
                                         "merge outputs of one model, or pass --allow-mixed-models")
            path, is_error = row.get("path"), bool(row.get("error"))
            if path is None:
                counts.no_path += 1
                continue
            path = resume_key(path)
            have = chosen.get(path)
            if have is None:
                chosen[path] = (pi, ri, is_error)
            elif have[2] and not is_error:
                chosen[path] = (pi, ri, False)
                counts.recovered += 1
    if counts.no_path:
        logger.warning("dropped %d records without a path", counts.no_path)

    tmp = out.with_name(f".{out.stem}.merge-{uuid.uuid4().hex[:8]}{out.suffix}")
    try:
        with open_writer(tmp, resume=False, flush_every=flush_every, flush_seconds=float("inf")) as writer:
            for pi, part in enumerate(part_paths):
                for ri, row in enumerate(read_results(part, provenance=True)):
                    path = row.get("path")
                    if path is not None and chosen[resume_key(path)][:2] == (pi, ri):
                        writer.write(row)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".parts"), ignore_errors=True)
    counts.paths = len(chosen)
    counts.errors = sum(1 for _, _, err in chosen.values() if err)
    counts.scored = counts.paths - counts.errors
    counts.duplicates = counts.rows - counts.no_path - counts.paths
    logger.debug("merged %d parts into %s: %d records", counts.parts, out, counts.paths)
    return counts


def _model_text(model: tuple[str | None, str | None]) -> str:
    name, digest = model
    return f"model {name} ({digest})" if name or digest else "an unrecorded model"
