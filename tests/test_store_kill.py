"""Nothing lost: the run store under `kill -9` in the middle of saving, and a store that cannot be
written. A forked child (sharing the parent's imports and analyses) saves in a loop and reports each
saved id through a pipe; the parent kills it with SIGKILL at a random moment, opens the store again
(as a restarted server does) and checks: every reported run is listed and opens equal to what was
saved, every listed run opens (none half-written), and SQLite's integrity_check says ok.
A read-only folder (a real one: chmod, and root without CAP_DAC_OVERRIDE) and a full disk (SQLite's
max_page_count) each give one sentence on the Runs page, which keeps serving."""
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sam_viz.store
from conftest import shared
from sam_viz import RunSpec, analyze
from sam_viz.store import DAMAGED, FULL, READ_ONLY, READ_ONLY_SAVE, RunStore, StoreError
from test_app import PAGES, PROMPT, ROOT, open_app, run_db  # noqa: F401 - run_db: a fresh run store per test
from test_store import assert_same

ROUNDS = 50


@pytest.fixture(scope="module")
def bases():
    """Saved in turn by the child: a small run and one of a few MB (its save takes a while)."""
    specs = [RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.3),
             RunSpec(prompt=PROMPT * 3, model="demo-lm", policy="dense", density=1.0)]
    return [analyze(shared(s.model), s) for s in specs]


def variant(bases, i: int):
    """The i-th run the child saves: a base analysis under a prompt of its own (so a new run)."""
    a = bases[i % len(bases)]
    return replace(a, spec=replace(a.spec, prompt=f"{a.spec.prompt} #{i}"))


def _saver(path, bases, start: int, fd: int) -> None:
    """The child: save variants from `start` on, forever, writing 'i id' after each save returns. One
    torch thread: the parent's OpenMP pool did not survive the fork, and a parallel copy would wait on it."""
    torch.set_num_threads(1)
    store = RunStore(path)
    for i in range(start, start + 10_000):
        run_id = store.save(variant(bases, i))
        os.write(fd, f"{i} {run_id}\n".encode())
    os._exit(0)


def _kill_while_saving(path, bases, start: int, delay: float) -> list[tuple[int, str]]:
    """Fork a saver; once it reported its first save, SIGKILL it after `delay` s (most likely in the
    middle of a later save); the (i, id) pairs it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                              # child
        os.close(r)
        try:
            _saver(path, bases, start, w)
        finally:
            os._exit(1)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        assert ready, "the saver reported no save within 120 s"
        time.sleep(delay)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        lines = f.read().decode().splitlines()
    return [(int(i), run_id) for i, run_id in (line.split() for line in lines)]


def _index(prompt: str) -> int:
    """Which variant a loaded run is, from the '#i' its prompt ends with."""
    return int(prompt.rsplit("#", 1)[1])


def test_kill_9_in_the_middle_of_saving_loses_nothing_and_leaves_no_half_run(tmp_path, bases):
    path, rng = tmp_path / "runs.sqlite", random.Random(0)
    RunStore(path)
    reported, checked, start = {}, set(), 0
    for _ in range(ROUNDS):
        got = _kill_while_saving(path, bases, start, rng.uniform(0.0, 0.05))
        reported.update({run_id: i for i, run_id in got})
        start += 10_000
        store = RunStore(path)                                # the restarted server
        listed = {r["id"] for r in store.list(limit=10_000)}
        assert set(reported) <= listed
        for run_id in listed - checked:                       # each run opened once it appears
            a = store.load(run_id)
            i = _index(a.spec.prompt)
            assert reported.get(run_id, i) == i
            assert_same(a, variant(bases, i))
        checked |= listed
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert len(reported) >= ROUNDS and len(checked) >= len(reported)


def _runs_page_saves(at):
    return next(b for b in at.button if b.label == "Save run").click().run()


def _full_disk(monkeypatch):
    """SQLite's own 'database or disk is full': each connection may not grow the file any more."""
    real = sqlite3.connect

    def connect(*args, **kwargs):
        db = real(*args, **kwargs)
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        return db
    monkeypatch.setattr(sam_viz.store.sqlite3, "connect", connect)


def test_a_full_store_is_one_sentence_and_the_app_keeps_serving(run_db, monkeypatch):  # noqa: F811
    at = open_app("runs", model="tiny-llama", prompt=PROMPT)
    first = _runs_page_saves(at)                              # a run saved before the disk fills
    assert not first.exception and not first.error
    saved = RunStore(run_db).list()
    _full_disk(monkeypatch)
    at = open_app("runs", model="tiny-llama", prompt=PROMPT, density="0.4")
    at = _runs_page_saves(at)
    assert not at.exception
    assert [e.value for e in at.error] == [FULL]
    assert len(at.dataframe) == 1                             # the runs saved before are still listed
    again = open_app("firing", model="tiny-llama", prompt=PROMPT, density="0.4")
    assert not again.exception and not again.error and again.get("plotly_chart")
    monkeypatch.undo()
    assert RunStore(run_db).list() == saved                   # the failed save left nothing
    with sqlite3.connect(run_db) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


READ_ONLY_CHILD = textwrap.dedent("""
    import json
    from streamlit.testing.v1 import AppTest
    from sam_viz.store import RunStore
    store = RunStore()
    out = {{"listed": [r["id"] for r in store.list()],
            "loaded": {{i: store.load(i).compare for i in {ids!r}}}}}
    for page in ("runs", "firing"):
        at = AppTest.from_file({pages!r}[page], default_timeout=180)
        if page == "firing":
            at.query_params["run"] = {ids!r}[0]              # a share link of a saved run
        else:
            at.query_params.update(model="tiny-llama", prompt="The cat sat.")
        at.run()
        if page == "runs":
            at = next(b for b in at.button if b.label == "Save run").click().run()
        ctx = at.session_state["ctx"] if "ctx" in at.session_state else None
        out[page] = dict(exception=[str(e.value) for e in at.exception], error=[e.value for e in at.error],
                         charts=len(at.get("plotly_chart")), tables=len(at.dataframe),
                         run_id=ctx.run_id if ctx else None)
    print(json.dumps(out))
""")


def _without_root_powers() -> list[str]:
    """Root writes into a read-only folder; without CAP_DAC_OVERRIDE it obeys the folder's mode."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): a read-only folder cannot be made")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def _read_only_child(db: Path, ids: list[str]) -> dict:
    env = {**os.environ, "SAM_VIZ_RUN_DB": str(db), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    pages = {k: str(ROOT / v) for k, v in PAGES.items()}
    db.parent.chmod(0o555)
    try:
        proc = subprocess.run([*_without_root_powers(), sys.executable, "-c", READ_ONLY_CHILD.format(pages=pages, ids=ids)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        db.parent.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("writer", [False, True], ids=["no-writer", "a-writer-with-its-wal-open"])
def test_a_read_only_store_opens_its_runs_refuses_saves_in_one_sentence_and_the_app_keeps_serving(tmp_path, writer):
    """A store in a read-only folder (a teacher's runs on a read-only share): its runs are listed and
    open as saved, on the Runs page and by link; Save run is one sentence. With a writer elsewhere
    that holds its WAL open, the runs still only in the WAL are seen too."""
    db = tmp_path / "store" / "runs.sqlite"
    db.parent.mkdir()
    first = analyze(shared("tiny-llama"), RunSpec(prompt=PROMPT, model="tiny-llama"))
    second = analyze(shared("tiny-llama"), RunSpec(prompt=PROMPT, model="tiny-llama", density=0.3))
    ids = [RunStore(db).save(first)]
    held = None
    if writer:
        held = sqlite3.connect(db)                       # keeps -wal and -shm while the reader runs
        held.execute("PRAGMA wal_autocheckpoint = 0")
        held.execute("SELECT 1 FROM runs").fetchall()
        ids.append(RunStore(db).save(second))
        assert Path(f"{db}-wal").stat().st_size > 0
    db.chmod(0o444)
    try:
        got = _read_only_child(db, ids)
    finally:
        if held is not None:
            held.close()
    assert sorted(got["listed"]) == sorted(ids)
    for run_id, analysis in zip(ids, (first, second)):
        assert got["loaded"][run_id] == pytest.approx(analysis.compare, rel=1e-6)
    runs, firing = got["runs"], got["firing"]
    assert runs["exception"] == [] and runs["error"] == [READ_ONLY_SAVE] and runs["tables"] == 1
    assert firing["exception"] == [] and firing["error"] == [] and firing["run_id"] == ids[0]
    assert firing["charts"] >= 3


def test_a_store_that_can_be_neither_written_nor_read_is_one_sentence_and_the_app_keeps_serving(tmp_path):
    db = tmp_path / "store" / "runs.sqlite"                   # no store file yet, in a read-only folder
    db.parent.mkdir()
    env = {**os.environ, "SAM_VIZ_RUN_DB": str(db), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    pages = {k: str(ROOT / v) for k, v in PAGES.items()}
    db.parent.chmod(0o555)
    try:
        proc = subprocess.run([*_without_root_powers(), sys.executable, "-c", UNUSABLE_CHILD.format(pages=pages)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        db.parent.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs, firing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["exception"] == [] and runs["error"] == [READ_ONLY]
    assert firing["exception"] == [] and firing["charts"] >= 3                  # the live analysis is shown
    assert firing["error"] == [f"Saved run 'AAAAAAAAAAAA' cannot be opened ({READ_ONLY}); showing a live "
                               "analysis instead."]


UNUSABLE_CHILD = textwrap.dedent("""
    import json
    from streamlit.testing.v1 import AppTest
    out = []
    for page in ("runs", "firing"):
        at = AppTest.from_file({pages!r}[page], default_timeout=180)
        at.query_params.update(model="tiny-llama", prompt="The cat sat.")
        if page == "firing":
            at.query_params["run"] = "AAAAAAAAAAAA"
        at.run()
        if page == "runs":
            at = next(b for b in at.button if b.label == "Save run").click().run()
        out.append(dict(page=page, exception=[str(e.value) for e in at.exception], error=[e.value for e in at.error],
                        charts=len(at.get("plotly_chart"))))
    print(json.dumps(out))
""")


def test_a_damaged_store_file_is_one_sentence(tmp_path):
    db = tmp_path / "runs.sqlite"
    db.write_bytes(b"not a database, " * 512)
    with pytest.raises(StoreError) as exc:
        RunStore(db)
    assert str(exc.value) == DAMAGED
