"""Stops what is left of a local Ray instance once the process that started it is gone.

Run by :mod:`hvae_ray.sweep.local` before ``ray.init`` as ``python -I -S reaper.py <driver pid> <marker>``,
in a session of its own, with its standard input the read end of a pipe whose write end only the driver
holds: the pipe reads end-of-file the moment the driver ends, however it ends (``kill -9`` included), or
when the driver closes it because its instance was shut down.

Ray kills the processes the driver starts (GCS, raylet, dashboard, monitors) when the driver dies, but
not the ones they start: the dashboard's and runtime environment's agents, the dashboard's modules and
the workers can outlive it. This process tells them apart from everything else on the host by the
marker, an environment variable ``HVAE_RAY_INSTANCE=<random>`` that the driver sets only while
``ray.init`` starts the instance, so that exactly the instance's processes and the ones they start
inherit it. Some of those rewrite the memory that ``/proc/<pid>/environ`` shows (a process title), so
while the driver lives the marked processes and all their descendants are also recorded every second,
by PID and start time. When the pipe ends, every recorded process that is still the same process, every
marked one and all their descendants get SIGTERM, and SIGKILL after a grace period. Only this user's
processes are touched, never the driver, and nothing of a cluster the driver merely joined (it starts
no reaper for one).

Linux only (it reads ``/proc``); standard library only, so that it starts in milliseconds.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0


def _table() -> dict[int, tuple[int, int]]:
    """This user's live processes: {pid: (parent pid, start time in clock ticks)}."""
    uid, out = os.getuid(), {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] != b"Z":  # a zombie has ended already
                out[int(name)] = (int(fields[1]), int(fields[19]))
        except (OSError, IndexError, ValueError):  # ended while being read
            continue
    return out


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _marked(table: dict[int, tuple[int, int]], marker: bytes) -> set[int]:
    out = set()
    for pid in table:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read():
                    out.add(pid)
        except OSError:
            continue
    return out


def _instance(table, marker: bytes, seen: dict[int, int], spare: set[int]) -> set[int]:
    """The instance's processes alive now: recorded ones still the same process, marked ones, and all
    their descendants; never the ones in ``spare``."""
    roots = {pid for pid, start in seen.items() if pid in table and table[pid][1] == start}
    roots |= _marked(table, marker)
    return _descendants(roots - spare, table) - spare


def reap(marker: bytes, seen: dict[int, int], spare: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = _instance(_table(), marker, seen, spare)
        if not targets:
            return
        for pid in targets:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            time.sleep(0.1)
            table = _table()
            if not any(pid in table for pid in targets):
                break  # gone; the next round finds any that were started meanwhile


def main(argv: list[str]) -> int:
    driver, marker = int(argv[1]), f"HVAE_RAY_INSTANCE={argv[2]}\0".encode()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl+C or hangup meant for the driver is not for this process
    spare = {os.getpid(), driver}
    seen: dict[int, int] = {}
    table = _table()
    driver_start = table.get(driver, (0, None))[1]
    while driver in table and table[driver][1] == driver_start:
        seen.update({pid: table[pid][1] for pid in _instance(table, marker, seen, spare)})
        ready, _, _ = select.select([0], [], [], POLL_S)
        if ready and not os.read(0, 64):
            break  # the driver is gone, or its instance was shut down
        table = _table()
    reap(marker, seen, spare)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
