"""Measure a command: wall time and peak RSS of its whole process tree (client + workers)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import psutil

RESULTS = Path(__file__).parent / "results"


def _tree_rss(proc: psutil.Process) -> tuple[int, int, int, int]:
    """(total, largest process, the root process, largest child) resident bytes now."""
    total, largest, root, child = 0, 0, 0, 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        largest = max(largest, rss)
        if p.pid == proc.pid:
            root = rss
        else:
            child = max(child, rss)
    return total, largest, root, child


def run_measured(cmd: Sequence[str], interval: float = 0.2) -> dict[str, float]:
    """Run ``cmd`` to completion; return seconds and peak RSS in bytes: of the whole tree, of the
    largest process, of the root (the client, with a LocalCluster's scheduler) and of the largest
    child (a worker)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = [0, 0, 0, 0]

    def sample() -> None:
        while proc.poll() is None:
            peak[:] = [max(a, b) for a, b in zip(peak, _tree_rss(ps))]
            time.sleep(interval)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_total": peak[0], "peak_rss_largest": peak[1],
            "peak_rss_client": peak[2], "peak_rss_worker": peak[3]}


def machine() -> dict[str, Any]:
    return {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def previous(name: str) -> dict[str, Any]:
    """The last saved results of a benchmark without their header (benchmark, machine, date), so
    a run of some parts can keep the others and still be stamped with its own header."""
    path = RESULTS / f"{name}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    return {k: v for k, v in saved.items() if k not in ("benchmark", "machine", "date")}


def invocation() -> str:
    """How this benchmark process was started, as a command to run from the repository root."""
    module = Path(sys.argv[0]).with_suffix("").name
    return " ".join(["python -m benchmarks." + module, *sys.argv[1:]])


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **payload,
               "last_command": invocation()}
    path.write_text(json.dumps(payload, indent=2))
    return path
