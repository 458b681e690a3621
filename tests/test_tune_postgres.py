"""Two `tastelab tune` workers sharing one study on a real PostgreSQL server (started here, in a tmp dir).

The server runs as an unprivileged user (PostgreSQL refuses root): the ``postgres`` system user when
it exists (``runuser``), else ``nobody``. Binaries come from PATH or /usr/lib/postgresql/*/bin (Debian).
The test skips, saying why, only when no server can be started.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")
psycopg2 = pytest.importorskip("psycopg2", reason="PostgreSQL driver missing (pip install psycopg2-binary)")

from optuna.trial import TrialState  # noqa: E402

from test_tune import SPACE, _recipe, make_dataset  # noqa: E402  (tests/ is on sys.path: pytest's prepend import mode)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user_prefix() -> tuple[list[str], str | None]:
    """Command prefix that drops root for the server (empty when not root) and that user's name."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", user, "--"], user
        if shutil.which("su"):
            return ["su", "-s", "/bin/sh", user, "-c"], user  # handled specially below
    return [], None


def _run_as(prefix: list[str], cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    if prefix and prefix[0] == "su":
        import shlex

        return subprocess.run([*prefix, shlex.join(cmd)], **kw)  # type: ignore[call-overload]
    return subprocess.run([*prefix, *cmd], **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin")
    prefix, user = _as_user_prefix()
    if os.geteuid() == 0 and not prefix:
        pytest.skip("running as root and no unprivileged user (postgres/nobody) + runuser/su to start PostgreSQL")
    # Not under pytest's tmp_path: its parents are private to root and the server user must reach the folder.
    root = Path(tempfile.mkdtemp(prefix="tastelab-pg-"))
    os.chmod(root, 0o755)
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if user:
        pw = pwd.getpwnam(user)
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    started = False
    try:
        init = _run_as(prefix, [initdb, "-D", str(data), "-U", "tastelab", "--auth=trust", "-E", "UTF8",
                                "--no-sync"], capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            pytest.skip(f"initdb failed, cannot start PostgreSQL: {init.stderr.strip()[-500:]}")
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = _run_as(prefix, [pg_ctl, "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
                        capture_output=True, text=True, timeout=90)
        if start.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]} {server_log[-500:]}")
        started = True
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="tastelab", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE tune")
        conn.close()
        yield f"postgresql+psycopg2://tastelab@127.0.0.1:{port}/tune"
    finally:
        if started:
            _run_as(prefix, [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                    timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # two cold-started CLI processes + a server: ~20 s on an idle 2-core machine, a minute when busy
def test_two_workers_share_one_postgres_study(tmp_path: Path, pg_url: str) -> None:
    data = make_dataset(tmp_path / "data")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(data)))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    total = 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i in range(2):  # like two machines: separate output folders, one storage
        cmd = [sys.executable, "-m", "tastelab.cli.main", "tune", str(cfg), "--space", str(space),
               "--storage", pg_url, "--study", "shared", "--trials", str(total), "--out", str(tmp_path / f"w{i}"),
               "--pruner", "none", "--sampler", "random"]
        log = open(tmp_path / f"w{i}.log", "w")  # noqa: SIM115  (closed below)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for p, log in procs:
        p.wait(timeout=300)
        log.close()
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p, _ in procs] == [0, 0], logs

    study = optuna.load_study(study_name="shared", storage=pg_url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == total
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == total  # workers seeded apart
    # Both workers ran trials (each writes its trial folders into its own OUT).
    ran = [sorted(p.name for p in (tmp_path / f"w{i}" / "trials").iterdir()) for i in range(2)]
    assert all(ran) and not set(ran[0]) & set(ran[1]), ran
    # Every non-counted trial is a surplus guard (two workers racing for the last slot), never a crash.
    others = [t for t in study.trials if t not in finished]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get("surplus") for t in others)
    for i in range(2):
        summary = json.loads((tmp_path / f"w{i}" / "tune_summary.json").read_text())
        assert summary["counts"]["COMPLETE"] == total and "tastelab@127.0.0.1" in summary["storage"]
        assert (tmp_path / f"w{i}" / "best-run" / "best" / "config.json").exists()  # copied or retrained

