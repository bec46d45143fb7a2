"""What the benchmark scripts share: child processes, GPU sampling, jets and configs, tables, arguments.

``Child(fn, kwargs).result()``: ``fn`` (of a script here or of hvae_ray) in a fresh process that prints its result."""

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hvae_ray.config import Config, parse_override
from hvae_ray.data.io import load_jets
from hvae_ray.data.jets import from_padded
from hvae_ray.engine import fit, resolve_device
from hvae_ray.sweep import resources as rs
from hvae_ray.sweep.spec import ResourceSpec

MiB, GiB = 2**20, 2**30
METRICS = ("w1m", "w1p_mean", "w1efp_mean", "fpd", "kpd")  # the generation metrics the tables show
# NCCL_NVLS_ENABLE=0: no NVLink multicast (shared hosts). RAY_ADDRESS=local: a child's ray.init starts its own
# instance, never joining a cluster that `ray start` left on the host.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
T0 = time.perf_counter()


def started() -> float:
    """This process's start on the time.perf_counter clock (Linux), so that start-up times include the imports."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks)


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Child(subprocess.Popen):
    """``target(**kwargs)`` in a fresh process group, output to ``log``; stopped (Ray too) ``timeout`` s on."""

    def __init__(self, target, kwargs: dict | None = None, *, timeout: float = 600, env: dict | None = None,
                 log: str | Path | None = None):
        self.timeout, self.t0, self.keep = timeout, time.perf_counter(), log is not None
        self.log = Path(log) if log else Path(tempfile.mkstemp(prefix="bench-", suffix=".log")[1])
        mod = target.__module__ if target.__module__ != "__main__" else Path(sys.modules["__main__"].__file__).stem
        cmd = [os.path.abspath(__file__), mod, target.__name__, json.dumps(kwargs or {}, default=str)]
        with open(self.log, "w") as fh:
            super().__init__([sys.executable, "-u", *cmd], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **CHILD_ENV, **(env or {})})

    def stop(self, sig=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def result(self) -> dict:
        """The child's RESULT dict with child_s, returncode and timed_out; {"error", "log_tail"} without one."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout=max(1.0, self.timeout - (time.perf_counter() - self.t0)))
        if timed_out := self.returncode is None:  # SIGTERM, then 20 s on SIGKILL
            self.stop(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(timeout=20)
        if self.returncode is None:
            self.stop()
            self.wait()
        lines = (text := self.log.read_text(errors="replace")).splitlines()
        if not self.keep:
            self.log.unlink(missing_ok=True)
        res = next((json.loads(x[7:]) for x in reversed(lines) if x.startswith("RESULT ")), None)
        if res is None:
            last = next((x for x in reversed(lines) if x.strip()), "no output")
            res = {"error": f"timed out after {self.timeout:.0f} s" if timed_out else last, "log_tail": text[-3000:]}
        return {**res, "child_s": time.perf_counter() - self.t0, "returncode": self.returncode, "timed_out": timed_out}


def smi(query: str) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-...`` (csv, no header, no units); [] without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no nvidia-smi, it failed or hung
        return []
    return [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.strip()]


def num(x: str) -> float:
    return float(x) if x.replace(".", "", 1).isdigit() else math.nan


def process_mib(pid: int) -> float | None:
    return next((num(r[1]) for r in smi("--query-compute-apps=pid,used_memory") if r[0] == str(pid)), None)


def nvml_used(index: int = 0) -> float | None:
    """Used memory of GPU ``index`` in MiB through NVML (an int index does not initialise CUDA), or None."""
    with contextlib.suppress(Exception):  # no NVML: no figure
        return torch.cuda.device_memory_used(index) / MiB
    return None


def sync(dev="cpu") -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def clock(fn, *args, dev="cpu", **kw):
    """``fn(*args, **kw)`` and its wall time in s, CUDA synchronised before and after on ``dev``."""
    sync(dev)
    t = time.perf_counter()
    out = fn(*args, **kw)
    sync(dev)
    return out, time.perf_counter() - t


def torch_peaks(dev=None) -> dict:
    """torch's peak allocated and reserved CUDA memory, MiB."""
    return {"peak_allocated_mib": torch.cuda.max_memory_allocated(dev) / MiB,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(dev) / MiB}


def cap_allocator(share: float, card_gb: float) -> float:
    """Cap the allocator to ``share`` of a ``card_gb`` card, as the runner caps a trial; the fraction set."""
    frac = rs.allocator_fraction(share, card_gb * GiB, torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.set_per_process_memory_fraction(frac, 0)
    return frac


class GpuSampler(threading.Thread, contextlib.AbstractContextManager):
    """nvidia-smi every 0.2 s in a ``with`` block: each card's utilisation and memory, each process's memory."""

    def __init__(self):
        super().__init__(daemon=True)
        self.util, self.apps, self.halt = [], [], threading.Event()  # (t, card, util %, MiB), (t, {pid: MiB})
        self.start()

    def run(self) -> None:
        while not self.halt.is_set():
            t, apps = time.time(), smi("--query-compute-apps=pid,used_memory")
            self.util += [(t, r[0], num(r[1]), num(r[2])) for r in smi("--query-gpu=index,utilization.gpu,memory.used")]
            self.apps.append((t, {int(r[0]): num(r[1]) for r in apps if r[0].isdigit()}))
            self.halt.wait(0.2)

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(timeout=30)

    def window(self, t0: float = 0.0, t1: float = math.inf) -> dict:
        """Within [t0, t1] (unix time), card by card: busy fraction (utilisation > 0), mean utilisation, peak and
        least used MiB; the share of samples with a compute process, the most at once, peak and median MiB of one."""
        s = [x for x in self.util if t0 <= x[0] <= t1]
        by = [[x for x in s if x[1] == c] for c in sorted({x[1] for x in s})]
        apps = [a for t, a in self.apps if t0 <= t <= t1] if s else []
        per = [m for a in apps for m in a.values()]
        return {"busy_fraction": [sum(x[2] > 0 for x in c) / len(c) for c in by],
                "util_mean_pct": [float(np.mean([x[2] for x in c])) for c in by], "process_median_mib": median(per),
                "used_peak_mib": [max(x[3] for x in c) for c in by], "used_min_mib": [min(x[3] for x in c) for c in by],
                "process_present_fraction": sum(map(bool, apps)) / len(apps) if apps else None,
                "processes_at_once_max": max(map(len, apps), default=None), "process_peak_mib": max(per, default=None)}

    def peaks(self) -> dict[int, float]:
        """pid → the most memory the process held, MiB."""
        return {p: max(a.get(p, 0.0) for _, a in self.apps) for p in {p for _, a in self.apps for p in a}}


def load_sample(data: str | None, jets: int = 0, tile: bool = False):
    """``jets`` jets of ``data`` (0: all; ``tile``: repeated), or synthetic ones of 10-30 particles without it."""
    if data:
        s = load_jets(data)
        return s.subset(np.resize(np.arange(len(s)), jets) if tile else np.arange(min(jets or len(s), len(s))))
    rng = np.random.default_rng(0)
    eta_phi = rng.normal(0, 0.15, (jets, 30, 2))
    pt = rng.exponential(1, (jets, 30)) * (np.arange(30)[None] < rng.integers(10, 31, jets)[:, None])
    return from_padded(np.concatenate([eta_phi, (pt / pt.sum(1, keepdims=True))[..., None]], -1).astype(np.float32))


def parse_sets(items) -> dict:
    return dict(parse_override(s) for s in items or [])


def config(sets=(), extra: dict | None = None):
    return Config().with_overrides({**parse_sets(sets), **(extra or {})})


def fit_child(data: str | None, jets: int, epochs: int, device: str = "auto", sets=(), share: float = 0.0,
              card_gb: float = 0.0, memory_steps: int = 0) -> dict:
    """engine.fit as a trial runs it, capped to ``share`` of a ``card_gb`` card: epoch wall and CPU times, report
    intervals, start-up, threads; on CUDA torch's peaks and the runner's sizing burst (``memory_steps``) and share."""
    t_start = started()
    cfg, dev, stamps = config(sets, {"epochs": epochs, "data.max_jets": jets or None}), resolve_device(device), []
    res: dict = {"pid": os.getpid(), "device": str(dev), "jets": jets, "epochs": epochs}
    if dev.type == "cuda" and share:
        res["allocator_fraction"] = cap_allocator(share, card_gb)
    with tempfile.TemporaryDirectory() as tmp:  # process CPU time: less sensitive to other jobs on the host
        cpu0 = time.process_time()
        fit(cfg, load_sample(data, 0 if data else jets), save_dir=Path(tmp) / "run", log_dir=Path(tmp) / "tb",
            progress=False, device=dev, callbacks=[lambda r: stamps.append((
                r.metrics["epoch_time_s"], time.perf_counter(), torch.get_num_threads(), time.process_time()))])
    t_end, (ep, at, threads, cpu) = time.perf_counter(), zip(*stamps)
    cpu_s = [b - a for a, b in zip((cpu0, *cpu), cpu)]
    res.update(epoch_time_s=ep, threads_in_training=threads[-1], total_s=t_end - t_start, epoch_cpu_s=cpu_s,
               after_last_report_s=t_end - at[-1], startup_s=at[0] - t_start - ep[0], epoch_min_s=min(ep[1:] or ep),
               interval_s=[b - a for a, b in zip((t_start, *at), at)], epoch_cpu_min_s=min(cpu_s[1:] or cpu_s))
    if dev.type == "cuda":
        res.update(**torch_peaks(), process_mib_now=process_mib(os.getpid()))
        measured = rs.measure_trial_memory(memory_steps, cfg=cfg, use_cache=False) if memory_steps else None
        if measured:
            res["runner_measured_mib"] = {k: v / MiB for k, v in measured.items() if isinstance(v, float)}
            trial, context = rs.trial_footprint(measured)
            res["runner_share"] = rs.gpu_fraction(card_gb * GiB, trial, ResourceSpec().headroom, context)
    return res


def median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(xs)) if xs else None


def ratio(a, b):
    return a / b if a and b else None


def fmt(x, d: int | str = 1) -> str:
    """``x`` to ``d`` decimals (or the format spec ``d``); n/a for None; lists and dicts item by item."""
    if isinstance(x, dict):
        return ", ".join(f"{k} {fmt(v, d)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, d) for v in x)
    if isinstance(x, float) and math.isfinite(x):
        return f"{x:{f'.{d}f' if isinstance(d, int) else d}}"
    return "n/a" if x is None else str(x)


def table(items: list[dict], keys: str | list[str], title: str = "") -> str:
    """A Markdown table of ``items``, a column per key (space-separated; numbers to 4 digits); "" without items."""
    keys = keys.split() if isinstance(keys, str) else keys
    head = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    rows = ["| " + " | ".join(fmt(x.get(k), ".4g").replace("|", "\\|") for k in keys) + " |" for x in items]
    return "\n".join(head + rows) if items else ""


def host() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "node": platform.node(), "cpu_cores": os.cpu_count(),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "gpus": smi("--query-gpu=index,name,memory.total,driver_version")}


def parser(doc: str | argparse.ArgumentParser, *common: str, **plain) -> argparse.ArgumentParser:
    """A parser showing ``doc`` (or ``doc`` itself, a parser) with the ``common`` options (data, set, out, skip) and
    ``plain`` ones, each ``name=default`` or ``name=(default, help[, metavar])``: typed by the default; a type: that
    type, default None; ``...``: a required string; False: a flag; a list: repeatable (KEY=VALUE)."""
    p = doc if isinstance(doc, argparse.ArgumentParser) else argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kw in (("data", {"help": "jets file (default: synthetic jets, 10-30 particles)"}),
                     ("set", {"action": "append", "default": [], "metavar": "KEY=VALUE", "help": "config override"}),
                     ("out", {"metavar": "DIR", "help": "write results.json and results.md there"}),
                     ("skip", {"default": set(), "type": lambda v: set(v.split(",")), "help": "parts to leave out"})):
        if name in common:
            p.add_argument(f"--{name}", **kw)
    for name, value in plain.items():
        default, *text = value if isinstance(value, tuple) else (value,)
        kw = ({"type": default, "default": None} if isinstance(default, type) else
              {"required": True} if default is ... else
              {"action": "store_true"} if default is False else
              {"action": "append", "default": [], "metavar": "KEY=VALUE"} if isinstance(default, list) else
              {"type": type(default), "default": default})
        p.add_argument("--" + name.replace("_", "-"), **{**kw, **dict(zip(("help", "metavar"), text))})
    return p


def save(a: argparse.Namespace, results: dict, *parts: str) -> None:
    """Print the Markdown ``parts``; write them and ``results`` to ``--out`` (called again as parts finish)."""
    if markdown := "\n\n".join(x for x in parts if x):
        print(markdown, flush=True)
    if getattr(a, "out", None):
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
        if markdown:
            (Path(a.out) / "results.md").write_text(markdown + "\n")


if __name__ == "__main__":  # a Child: python harness.py MODULE FN KWARGS
    fn = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
    print("RESULT " + json.dumps(fn(**json.loads(sys.argv[3])), default=str), flush=True)
