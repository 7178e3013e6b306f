"""A memory probe for the Streamlit server that bench/memory_server.py starts with --probe PATH (this
folder on PYTHONPATH, SAM_VIZ_MEM_PROBE=PATH): a thread in the server writes one JSON line every 15 s
with VmRSS, glibc's malloc figures (mallinfo2: bytes in use, bytes free kept in its arenas), Python's
allocated blocks, threads and Streamlit sessions, and every 2 minutes the object count and commonest
types. It tells a leak (memory in use or objects rising) from the allocator keeping freed memory."""
import ctypes
import gc
import json
import os
import sys
import threading
import time
from collections import Counter


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sessions() -> dict:
    try:
        from streamlit.runtime import Runtime

        manager = Runtime.instance()._session_mgr
        return {"active_sessions": len(manager.list_active_sessions()),
                "stored_sessions": len(manager._session_storage.list())}
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never stops the server
        return {"sessions": repr(exc)[:80]}


def _row(libc, count_objects: bool) -> dict:
    m = libc.mallinfo2()
    row = {"t": round(time.time(), 1), "rss_mib": round(_rss_mib(), 1),
           "malloc_in_use_mib": round((m.uordblks + m.hblkhd) / 2**20, 1),
           "malloc_free_mib": round(m.fordblks / 2**20, 1), "py_blocks": sys.getallocatedblocks(),
           "threads": threading.active_count(), **_sessions()}
    if count_objects:
        objects = gc.get_objects()
        row["objects"] = len(objects)
        row["top_types"] = Counter(type(o).__name__ for o in objects).most_common(12)
    return row


def _probe(path: str) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    for n in range(10**9):
        time.sleep(15)
        with open(path, "a") as f:
            f.write(json.dumps(_row(libc, n % 8 == 0)) + "\n")


if os.environ.get("SAM_VIZ_MEM_PROBE") and "streamlit" in sys.orig_argv:
    threading.Thread(target=_probe, args=(os.environ["SAM_VIZ_MEM_PROBE"],), daemon=True, name="memprobe").start()
