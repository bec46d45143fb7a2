"""Generation from any script: worker processes that never re-run the caller's main module, a task list
that is streamed, sizes refused before any work, and workers that end with an error or Ctrl+C."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from hvae_ray.data import generate
from hvae_ray.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_unguarded_script_generates_once(tmp_path):
    """A script without ``if __name__ == "__main__":`` that generates jets on two workers runs once and
    ends (multiprocessing's spawn pool re-ran it in every child, endlessly)."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "my_analysis.py"
    script.write_text(textwrap.dedent(f"""
        import os
        with open({str(marker)!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        from hvae_ray.data.generate import default_sample
        from hvae_ray.data.io import load_jets
        path = default_sample("q", 150, seed=3, progress=False)   # all cores: 2 chunks, 2 workers
        print("done", len(load_jets(path)))
    """))
    env = {**os.environ, "HVAE_RAY_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "done 150"
    assert len(marker.read_text().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def _recording_workers(monkeypatch) -> list[subprocess.Popen]:
    started: list[subprocess.Popen] = []
    real = generate._start_worker

    def start():
        proc = real()
        started.append(proc)
        return proc

    monkeypatch.setattr(generate, "_start_worker", start)
    return started


@pytest.mark.slow
def test_a_failing_chunk_is_one_error_and_the_workers_end(monkeypatch):
    started = _recording_workers(monkeypatch)
    tasks = iter([("q", 0, 0, 3), ("nope", 0, 1, 3), ("q", 0, 2, 3)])
    with pytest.raises(RuntimeError, match=r"generating chunk 1: KeyError"):
        generate._run_workers(tasks, 2, lambda *chunk: None)
    assert len(started) == 2 and all(proc.poll() is not None for proc in started)


@pytest.mark.slow
def test_interrupt_ends_the_workers(monkeypatch):
    started = _recording_workers(monkeypatch)

    def store(*chunk):
        raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        generate._run_workers(generate._tasks("q", 0, 400, 10), 2, store)
    assert all(proc.poll() is not None for proc in started)
    assert time.monotonic() - t0 < 30  # terminated, not left to finish their chunks


def test_task_list_is_streamed():
    tracemalloc.start()
    try:
        tasks = generate._tasks("q", 0, 10**12, 100)
        first = [next(tasks) for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first == [("q", 0, 0, 100), ("q", 0, 1, 100), ("q", 0, 2, 100)]
    assert peak < 1 << 20


def test_too_many_jets_for_memory_is_refused_before_any_work():
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ConfigError) as excinfo:
            generate.generate_jets("q", 10**10, seed=0, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(excinfo.value)
    assert "\n" not in msg and "n_jets = 10000000000" in msg and "memory" in msg and "available" in msg
    assert peak < 1 << 20 and time.monotonic() - t0 < 5


def test_too_many_jets_for_the_disk_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "available_memory", lambda: 1 << 62)
    free = __import__("shutil").disk_usage(tmp_path).free
    n = free // generate.DISK_BYTES_PER_JET + 1
    with pytest.raises(DataError) as excinfo:
        generate.check_generation_size(n, tmp_path / "not" / "yet")
    msg = str(excinfo.value)
    assert "\n" not in msg and str(tmp_path / "not" / "yet") in msg and "on disk" in msg and "free" in msg
    generate.check_generation_size(1000, tmp_path / "not" / "yet")  # a small sample fits


def test_default_sample_too_large_for_the_cache_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("HVAE_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(generate, "available_memory", lambda: 1 << 62)
    n = __import__("shutil").disk_usage(tmp_path).free // generate.DISK_BYTES_PER_JET + 1

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(generate, "generate_jets", no_generation)
    with pytest.raises(DataError, match="on disk"):
        generate.default_sample("q", int(n), seed=0, progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
