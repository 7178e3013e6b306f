"""bench/memory_server.py's readings of another process (the real run takes many minutes and lives in
bench/results/memory_server.json): the resident set it reads matches what the process wrote into
memory, and it refuses to measure a process that is not the Python running streamlit."""
import subprocess
import sys

import pytest

from bench.memory_server import check_server_process, server_rss_mib

HOLD_MIB = 256


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
