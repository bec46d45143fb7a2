"""The sweep driver's own part of Tune's loop: signing the state Tune saves, and stopping on signals.

Ray Tune stops a sweep gracefully on the first SIGINT (Ctrl+C): it saves its state, ends the trials and
returns their results. It then puts back the SIGINT handler it found, so a second Ctrl+C used to raise
KeyboardInterrupt in the middle of that stop (no summary, no resume hint), and SIGTERM killed the driver
outright (Ray's C++ threads aborted with a stack dump). :func:`stop_on_signals` makes SIGTERM stop a
sweep as Ctrl+C does and lets a second Ctrl+C (or SIGTERM) wait for the stop under way; a third
Ctrl+C gives up waiting.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

from ray.tune import Callback

from hvae_ray.sweep.signing import Signer

#: Set while Tune's loop runs (between its callbacks' setup and the experiment's end).
TUNE_LOOP = threading.Event()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside Tune's loop: ends the command as Ctrl+C would, with exit code 143."""


class SignState(Callback):
    """Signs the state Tune saves (:mod:`hvae_ray.sweep.signing`) after each step of its loop, where
    Tune writes it, and at the experiment's end; marks the loop as running for :func:`stop_on_signals`."""

    def __init__(self, experiment_dir: str):
        self.signer = Signer(experiment_dir)

    def setup(self, **info):
        TUNE_LOOP.set()

    def get_state(self):
        # Asked for while Tune saves its state, after it wrote the experiment and search states to its
        # staging folder and before it copies them into the experiment: sign them there.
        self.signer.sign(staged=True)
        return None

    def on_step_end(self, iteration, trials, **info):
        self.signer.sign()

    def on_experiment_end(self, trials, **info):
        self.signer.sign()
        TUNE_LOOP.clear()


class Stopped:
    """What :func:`stop_on_signals` saw: the first stop signal (SIGINT or SIGTERM) and how many came."""

    def __init__(self):
        self.signal: int | None = None
        self.count = 0


@contextmanager
def stop_on_signals():
    """For the ``with`` block (a sweep's ``fit``): SIGTERM is handled as Ctrl+C is, and a Ctrl+C after
    the first waits for Tune's graceful stop (up to the third). Yields a :class:`Stopped`."""
    stopped = Stopped()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def on_int(sig, frame):
        # Tune's own handler takes the first SIGINT of its loop and then puts this one back.
        stopped.count += 1
        stopped.signal = stopped.signal or sig
        if not TUNE_LOOP.is_set() or stopped.count >= 2:
            raise Terminated() if stopped.signal == signal.SIGTERM else KeyboardInterrupt()
        print("hvae-ray: stopping the sweep: saving its state and ending its trials (Ctrl+C once more "
              "to stop waiting)", file=sys.stderr, flush=True)

    def on_term(sig, frame):
        stopped.signal = stopped.signal or signal.SIGTERM
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise Terminated()

    old_int = signal.signal(signal.SIGINT, on_int)
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stopped
    finally:
        TUNE_LOOP.clear()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
