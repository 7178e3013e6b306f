"""bench/memory_server.py's readings of another process (the real run takes many minutes and lives in
bench/results/memory_server.json): the resident set it reads matches what the process wrote into
memory, and it refuses to measure a process that is not the Python running streamlit."""
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.memory_server import check_server_process, server_rss_mib

HOLD_MIB = 256
ROOT = Path(__file__).resolve().parent.parent


def _started(argv: list[str], ready: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    if ready is not None:
        assert proc.stdout.readline().strip() == ready
    return proc


@pytest.fixture
def processes():
    started = []
    yield lambda *a: started.append(_started(*a)) or started[-1]
    for proc in started:
        proc.kill()
        proc.wait()


def test_rss_counts_the_memory_a_process_wrote(processes):
    """A Python that writes 256 MiB of non-zero bytes (every page touched) and idles: its RSS is at least
    that, and less than that plus what a bare interpreter holds."""
    bare = processes([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"], "ready")
    full = processes([sys.executable, "-c", f"import time; b = b'x' * ({HOLD_MIB} << 20); print('ready', flush=True); "
                      "time.sleep(60)"], "ready")
    base, held = server_rss_mib(bare.pid), server_rss_mib(full.pid)
    assert 0 < base < 100
    assert HOLD_MIB <= held <= HOLD_MIB + base + 10


def test_only_the_python_running_streamlit_is_measured(processes):
    python = processes([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)",
                        "streamlit"], "ready")
    assert "streamlit" in check_server_process(python.pid)
    other = processes([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"], "ready")
    with pytest.raises(RuntimeError, match="not the Python running streamlit"):
        check_server_process(other.pid)
    wrapper = processes(["sh", "-c", "echo ready; sleep 60; true", "streamlit"], "ready")    # $0: streamlit
    with pytest.raises(RuntimeError, match="not the Python running streamlit"):
        check_server_process(wrapper.pid)


ARENAS = """
import ctypes, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
start, done = threading.Barrier(16), threading.Barrier(16)

def work():                                   # 16 threads at once, as Streamlit's script runs are
    start.wait()
    block = libc.malloc(256)
    done.wait()
    libc.free(ctypes.c_void_p(block))

threads = [threading.Thread(target=work) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.malloc_stats()                           # glibc: one 'Arena i:' block per arena, on stderr
"""


def _make_run_env() -> dict[str, str]:
    """The variables `make run` sets on the line that starts the server (make -n: printed, not run)."""
    out = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    line = next(l for l in out.splitlines() if "streamlit run app.py" in l)
    return dict(word.split("=", 1) for word in itertools.takewhile(lambda w: "=" in w, line.split()))


@pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("make"), reason="glibc; make")
@pytest.mark.parametrize("launch", ["bare", "make-run"])
def test_the_server_as_make_run_starts_it_keeps_glibc_to_two_malloc_arenas(launch):
    """The server's RSS grew 12% over 200 analyses from freed memory kept in glibc's per-thread arenas
    (bench/results/memory_server_default_malloc.json; limited to two arenas it fell 12.5%,
    memory_server_arena2.json). A process started with `make run`'s variables makes at most two arenas
    when 16 threads allocate at once; a bare Python one per thread, up to 8 per core."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if launch == "make-run":
        env.update(_make_run_env())
    proc = subprocess.run([sys.executable, "-c", ARENAS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "Arena 0:" not in proc.stderr:
        pytest.skip("not glibc: no malloc_stats arenas")
    arenas = sum(line.startswith("Arena ") for line in proc.stderr.splitlines())
    assert arenas <= 2 if launch == "make-run" else arenas > 2
