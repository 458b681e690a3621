"""Running the trainer: its own process group, its log in the trial folder, a wall-clock limit, and clean
termination of everything it started.

Why a process group: trainers are launchers (``accelerate launch``, ``torchrun``, ``python -m ...``) that start
worker processes; killing only the launcher leaves the workers holding the GPU. The trainer is started with
``start_new_session=True`` (its own session and process group, so a terminal's Ctrl-C does not reach it
half-way either) and stopped with ``SIGTERM`` to the whole group, then ``SIGKILL`` after a grace period.
The group is also killed after a normal exit, so nothing the trainer left behind keeps running.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TrainerProcess", "kill_all", "tail"]

logger = logging.getLogger(__name__)

_LIVE: set[TrainerProcess] = set()  # every running trainer, so Ctrl-C in the tuner can stop them all
_LIVE_LOCK = threading.Lock()


def tail(path: Path, lines: int = 40, max_bytes: int = 16_384) -> str:
    """The last ``lines`` lines of a log (read from its last ``max_bytes``), as text."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


@dataclass
class TrainerProcess:
    """One trainer run. ``start`` launches it; ``terminate`` stops its whole process group."""

    argv: Sequence[str]
    log_path: Path
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ended: float | None = None

    def __hash__(self) -> int:
        return id(self)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            log.write(f"$ {shlex.join(list(self.argv))}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(list(self.argv), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.cwd,
                                         env=None if self.env is None else dict(self.env), start_new_session=True)
        except OSError as exc:  # no such program, not executable: the trial fails with this in its log
            log.write(f"cannot start the trainer: {exc}\n".encode())
            raise
        finally:
            log.close()  # the child holds its own descriptor
        self.started = time.monotonic()
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    @property
    def seconds(self) -> float:
        """Wall-clock seconds the trainer ran (so far)."""
        return (self.ended or time.monotonic()) - self.started

    def wait(self, on_tick: Callable[[], None], *, poll_s: float, timeout_s: float | None) -> tuple[int, bool]:
        """Call ``on_tick`` every ``poll_s`` seconds until the trainer exits or ``timeout_s`` passes (then the
        group is terminated). Returns ``(exit code, timed_out)``. An exception from ``on_tick`` (pruning)
        terminates the group and propagates."""
        try:
            while True:
                code = self.poll()
                if code is not None:
                    return code, False
                if timeout_s is not None and self.seconds > timeout_s:
                    logger.warning("trainer (pid %d) ran past --trial-timeout %.0fs; stopping it", self.pid,
                                   timeout_s)
                    return self.terminate(), True
                on_tick()
                time.sleep(poll_s)
        except BaseException:
            self.terminate()
            raise
        finally:
            self.kill_leftovers()

    def terminate(self) -> int:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; the exit code (negative: the signal)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("trainer (pid %d) ignored SIGTERM for %.0fs; killing its process group", self.pid,
                               self.grace_s)
                _signal_group(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.poll()
        self.kill_leftovers()
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        """Whatever is still in the trainer's group after its leader ended (workers, data loaders) gets the
        same treatment: SIGTERM, then SIGKILL after the grace period."""
        if self.proc is None or self.proc.poll() is None:
            return
        if _signal_group(self.pid, signal.SIGTERM):
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and _group_alive(self.pid):
                time.sleep(0.05)
            _signal_group(self.pid, signal.SIGKILL)
        with _LIVE_LOCK:
            _LIVE.discard(self)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by someone else's group: not ours to signal
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_all() -> int:
    """Terminate every trainer this process started and that still runs (Ctrl-C in the tuner)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for p in live:
        try:
            p.terminate()
        except Exception:  # one stuck trainer must not keep the others alive
            logger.exception("could not stop trainer pid %s", getattr(p.proc, "pid", "?"))
    return len(live)
