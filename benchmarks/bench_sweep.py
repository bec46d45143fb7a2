"""Sweep-level costs: Ray overhead per epoch, sweep throughput, and how busy the GPU is during a sweep.

(a) Ray overhead: the same data and config (default config, ``data.max_jets`` = N) trained by the
    bare engine (``engine.fit`` in a fresh process, with a save_dir and TensorBoard dir as a trial
    has) and as a one-trial sweep through ``run_sweep`` (Ray Tune + Ray Train TorchTrainer). Compares
    the ``epoch_time_s`` metric and the wall time between consecutive reports (``time_this_iter_s``
    in the trial's result.json vs the gap between the engine's callbacks), first epoch excluded, and
    the start-up time (start → first report, less the first epoch).
(b) Sweep throughput: a sweep file (default ``sweeps/quickstart.yaml``) end to end: wall time,
    trials/hour, per-trial start-up time and per-report overhead from the trials' result.json.
(c) GPU-busy fraction of that sweep's wall time: ``nvidia-smi`` sampled every 200 ms in the
    background (utilisation > 0, mean utilisation, and whether any compute process holds the GPU).

Usage: python benchmarks/bench_sweep.py [--data FILE] [--scales 250:6,10000:4]
           [--sweep sweeps/quickstart.yaml] [--sweep-set KEY=VALUE ...]
           [--gpu-memory-gb 4 [--trial-memory-mb auto] | --gpu-fraction 0.25] [--trial-cpus N]
           [--no-overhead] [--no-sweep] [--timeout 900] [--release-wait 15] [--storage DIR] [--json FILE]
Without --data, a synthetic sample is written to a temporary Parquet file for (a), and the sweep
file's own data section is used for (b). A scale is JETS:EPOCHS. Each sweep runs in a child process
with its own Ray instance and a time limit; results are read from the experiment directory, so a
sweep that hangs still reports what it finished. After each sweep the child waits up to
--release-wait seconds for Ray to free every CPU/GPU and reports any still held (a placement group
a trial left behind). Another Ray instance on the same host can make that happen: run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# GPU sampling


class GpuSampler:
    """nvidia-smi utilisation every ``interval_ms`` and the compute-process list every ~0.5 s."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.util: list[tuple[float, float, float]] = []  # (time, util %, memory.used MiB)
        self.apps: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._proc = None
        self._threads: list[threading.Thread] = []

    @staticmethod
    def available() -> bool:
        try:
            import torch

            if not torch.cuda.is_available():
                return False
            return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
        except Exception:  # noqa: BLE001
            return False

    def start(self) -> GpuSampler:
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                       "--format=csv,noheader,nounits", "-i", "0",
                                       f"-lms={self.interval_ms}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        def read_util():
            for line in self._proc.stdout:
                try:
                    u, m = (float(x) for x in line.strip().split(","))
                except ValueError:
                    continue
                self.util.append((time.time(), u, m))

        def poll_apps():
            while not self._stop.is_set():
                try:
                    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                         timeout=20).stdout
                    apps = {}
                    for line in out.strip().splitlines():
                        pid, mem = (x.strip() for x in line.split(","))
                        if pid.isdigit():
                            apps[int(pid)] = float(mem) if mem.replace(".", "").isdigit() else float("nan")
                    self.apps.append((time.time(), apps))
                except Exception:  # noqa: BLE001
                    pass
                self._stop.wait(0.5)

        self._threads = [threading.Thread(target=read_util, daemon=True),
                         threading.Thread(target=poll_apps, daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=10)
        out: dict = {"util_samples": len(self.util), "apps_samples": len(self.apps)}
        if self.util:
            utils = [u for _, u, _ in self.util]
            out["busy_fraction"] = sum(u > 0 for u in utils) / len(utils)
            out["util_mean_pct"] = statistics.fmean(utils)
            out["memory_used_peak_mib"] = max(m for _, _, m in self.util)
            out["memory_used_min_mib"] = min(m for _, _, m in self.util)
        if self.apps:
            out["any_process_fraction"] = sum(bool(a) for _, a in self.apps) / len(self.apps)
            out["max_concurrent_processes"] = max(len(a) for _, a in self.apps)
            per = [m for _, a in self.apps for m in a.values()]
            out["process_memory_peak_mib"] = max(per) if per else None
            out["process_memory_median_mib"] = statistics.median(per) if per else None
        return out


# --------------------------------------------------------------------------------------------------
# (a) bare engine vs the same run as a one-trial sweep


def bare_worker(a: argparse.Namespace) -> dict:
    """Runs in a fresh process: engine.fit as a trial runs it (save_dir + TensorBoard dir)."""
    t_start = time.perf_counter()
    import torch

    from hvae_ray.config import Config
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import fit

    cfg = Config().with_overrides({"epochs": a.epochs, "data.max_jets": a.jets})
    device = "cuda" if torch.cuda.is_available() and a.cuda else "cpu"
    stamps: list[tuple[float, float]] = []

    def cb(rep):
        stamps.append((rep.metrics["epoch_time_s"], time.perf_counter()))

    with tempfile.TemporaryDirectory() as tmp:
        sample = load_jets(a.data)
        fit(cfg, sample, save_dir=Path(tmp) / "run", log_dir=Path(tmp) / "tb", progress=False, device=device,
            callbacks=[cb])
    t_end = time.perf_counter()
    epoch_s = [s[0] for s in stamps]
    intervals = [stamps[0][1] - t_start] + [b[1] - a_[1] for a_, b in zip(stamps, stamps[1:])]
    return {"device": device, "threads": torch.get_num_threads(), "epoch_time_s": epoch_s,
            "interval_s": intervals, "total_s": t_end - t_start,
            "startup_s": intervals[0] - epoch_s[0], "after_last_report_s": t_end - stamps[-1][1]}


def trial_rows(experiment_dir: Path) -> dict[str, list[dict]]:
    rows = {}
    for d in sorted(p for p in experiment_dir.iterdir() if p.is_dir() and p.name.startswith("trial_")):
        f = d / "result.json"
        rows[d.name] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
    return rows


def mean_tail(xs: list[float]) -> float | None:
    xs = xs[1:] if len(xs) > 1 else xs
    return statistics.fmean(xs) if xs else None


STAGE_ACTORS = ("ImplicitFunc", "TrainController", "RayTrainWorker")
_TS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamp(line: str) -> float | None:
    m = _TS.match(line)
    if not m:
        return None
    day, ms = m.group(1).split(",")
    return time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def actor_timeline(session_dir: str, t0: float) -> list[dict]:
    """When each trial-driver (ImplicitFunc), TrainController and RayTrainWorker process started, got its
    actor and finished constructing it, and exited, in seconds after ``t0``, from Ray's worker logs."""
    logs = Path(session_dir) / "logs"
    out = []
    for f in logs.glob("worker-*.out"):
        head = f.read_text(errors="replace").splitlines()[:3]
        name = next((x.split(":", 2)[2] for x in head if x.startswith(":actor_name:")), None)
        if name not in STAGE_ACTORS:
            continue
        pid = f.stem.rsplit("-", 1)[-1]
        core = next(iter(logs.glob(f"python-core-worker-*_{pid}.log")), None)
        if core is None:
            continue
        ev: dict = {"actor": name, "pid": int(pid)}
        for line in core.read_text(errors="replace").splitlines():
            t = _stamp(line)
            if t is None:
                continue
            ev.setdefault("process_start", t - t0)
            if "Creating actor" in line:
                ev.setdefault("actor_create", t - t0)
            elif "Actor creation task finished" in line:
                ev.setdefault("actor_ready", t - t0)
            ev["last_log"] = t - t0
        out.append(ev)
    return sorted(out, key=lambda e: e.get("actor_create", e.get("process_start", 0)))


def sweep_child(a: argparse.Namespace) -> dict:
    """Runs in a fresh process (its own Ray instance): one run_sweep call, then how long Ray takes to
    give every CPU/GPU back (a placement group left behind by a trial would show here)."""
    from hvae_ray.config import parse_override
    from hvae_ray.sweep.tune import ray_init, run_sweep

    t = time.perf_counter()
    ray_init(None)
    out: dict = {"ray_init_s": time.perf_counter() - t}
    import ray
    from ray._private.services import find_gcs_addresses

    out["ray_instances_on_host"] = len(find_gcs_addresses())
    overrides = json.loads(a.overrides) if a.overrides else {}
    overrides.update(dict(parse_override(s) for s in a.sweep_set or []))
    t = time.perf_counter()
    t_wall = time.time()
    res = run_sweep(a.sweep, overrides or None, name=a.name, storage=a.storage)
    out["run_sweep_s"] = time.perf_counter() - t
    try:
        out["timeline"] = actor_timeline(ray._private.worker._global_node.get_session_dir_path(), t_wall)
    except Exception as e:  # noqa: BLE001 - log layout differs: no timeline
        out["timeline_error"] = repr(e)
    out["experiment_dir"] = str(res.experiment_dir)
    total = ray.cluster_resources()
    t = time.perf_counter()
    held = {}
    while time.perf_counter() - t < a.release_wait:
        avail = ray.available_resources()
        held = {k: round(total[k] - avail.get(k, 0.0), 4) for k in ("CPU", "GPU") if k in total
                and total[k] - avail.get(k, 0.0) > 1e-6}
        if not held:
            break
        time.sleep(0.25)
    out["resources_released_after_s"] = None if held else time.perf_counter() - t
    out["resources_still_held"] = held
    return out


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
               ) -> tuple[int, bool, str]:
    """Run ``cmd`` in its own process group with stdout and stderr to ``log``; after ``timeout`` seconds
    the whole group (a sweep's Ray instance included) is stopped. Returns (returncode, timed out, log text)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env=env)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
    return proc.returncode, timed_out, log.read_text(errors="replace")


def run_child(args, sweep_file: str, name: str, storage: Path, overrides: dict, sweep_set: list[str],
              gpu_sampler: bool) -> dict:
    """A sweep in a child process with a time limit; results come from the experiment directory, so
    a sweep that hangs still reports what it finished."""
    cmd = [sys.executable, "-u", __file__, "--sweep-child", "--sweep", sweep_file, "--name", name,
           "--storage", str(storage), "--overrides", json.dumps(overrides),
           "--release-wait", str(args.release_wait)]
    for s in sweep_set:
        cmd += ["--sweep-set", s]
    log = storage / f"{name}.log"
    sampler = GpuSampler().start() if gpu_sampler else None
    t0 = time.perf_counter()
    returncode, timed_out, text = run_logged(cmd, log, args.timeout)
    wall = time.perf_counter() - t0
    child = next((json.loads(x[7:]) for x in text.splitlines() if x.startswith("RESULT ")), {})
    out = {"wall_s": wall, "timed_out": timed_out, "returncode": returncode, "log": str(log), **child}
    if sampler is not None:
        out["gpu"] = sampler.stop()
    if not child:
        out["log_tail"] = text[-3000:]
    out["experiment_dir"] = str(storage / name)
    return out


def overhead(args, data: str, jets: int, epochs: int, storage: Path, gpu: bool) -> dict:
    cores = os.cpu_count() or 1
    cpus = max(1, cores - 1) if args.trial_cpus <= 0 else args.trial_cpus
    # Ray gives a worker OMP_NUM_THREADS = its CPUs; give the bare run the same thread count.
    env = {**os.environ, "OMP_NUM_THREADS": str(int(cpus))}
    cmd = [sys.executable, "-u", __file__, "--bare", "--data", data, "--jets", str(jets),
           "--epochs", str(epochs)] + (["--cuda"] if gpu else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    bare = next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    out: dict = {"jets": jets, "epochs": epochs, "trial_cpus": cpus}
    if bare is None:
        out["bare_error"] = proc.stderr[-3000:]
        return out
    out["bare"] = bare

    sweep = {"name": f"overhead_{jets}", "config": {"epochs": epochs, "data.max_jets": jets},
             "scheduler": {"max_t": epochs, "grace_period": epochs}, "num_samples": 1,
             "resources": {"num_workers": 1, "cpus_per_worker": float(cpus),
                           "gpu_fraction": 1.0 if gpu else 0.0},
             "data": {"path": str(Path(data).resolve())}, "storage": str(storage)}
    sweep_file = storage / f"overhead_{jets}.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep, sort_keys=False))
    name = f"overhead_{jets}_{int(time.time())}"
    r = run_child(args, str(sweep_file), name, storage, {}, [], False)
    out["sweep"] = {k: v for k, v in r.items() if k != "gpu"}
    exp = Path(r["experiment_dir"])
    rows = next(iter(trial_rows(exp).values()), []) if exp.is_dir() else []
    ep = [x["epoch_time_s"] for x in rows if "epoch_time_s" in x]
    it = [x["time_this_iter_s"] for x in rows if "time_this_iter_s" in x]
    out["ray"] = {"epoch_time_s": ep, "interval_s": it, "rows": len(rows),
                  "startup_s": (it[0] - ep[0]) if it and ep else None,
                  "time_total_s": rows[-1].get("time_total_s") if rows else None,
                  "time_total_s_first": rows[0].get("time_total_s") if rows else None}
    if r.get("timed_out") or "run_sweep_s" not in r:
        out["ray_error"] = f"sweep child {'timed out' if r.get('timed_out') else 'failed'}: " + \
            (r.get("log_tail") or "")[-1500:]
    if len(ep) < 2 or len(bare["epoch_time_s"]) < 2:
        return out
    b_ep, r_ep = mean_tail(bare["epoch_time_s"]), mean_tail(ep)
    b_it, r_it = mean_tail(bare["interval_s"]), mean_tail(it)
    out.update(bare_epoch_s=b_ep, ray_epoch_s=r_ep, epoch_ratio=r_ep / b_ep, bare_interval_s=b_it,
               ray_interval_s=r_it, interval_ratio=r_it / b_it, ray_over_bare_epoch_ratio=r_it / b_ep,
               bare_report_gap_s=b_it - b_ep, ray_report_gap_s=r_it - r_ep)
    return out


# --------------------------------------------------------------------------------------------------
# (b) + (c) a whole sweep


def whole_sweep(args, storage: Path, gpu: bool) -> dict:
    from hvae_ray.trials import load_trials

    overrides: dict = {}
    if args.data:
        raw = yaml.safe_load(Path(args.sweep).read_text()) or {}
        n = (raw.get("data") or {}).get("n_jets", 1000)
        overrides.update({"data.path": str(Path(args.data).resolve()), "config.data.max_jets": int(n)})
    if gpu and args.gpu_fraction is not None:
        overrides.update({"resources.gpu_fraction": args.gpu_fraction})
    elif gpu and args.gpu_memory_gb is not None:
        overrides.update({"resources.gpu_fraction": None, "resources.gpu_memory_gb": args.gpu_memory_gb,
                          "resources.trial_memory_mb": args.trial_memory_mb})
    name = f"sweepbench_{int(time.time())}"
    r = run_child(args, args.sweep, name, storage, overrides, args.sweep_set or [], gpu)
    out: dict = {"sweep": args.sweep, "overrides": overrides, "set": args.sweep_set or [], **r}
    exp = Path(r["experiment_dir"])
    if r.get("timed_out") or "run_sweep_s" not in r:
        out["error"] = f"sweep timed out after {r['wall_s']:.0f} s" if r.get("timed_out") else "sweep failed"
    if not (exp / "hvae_sweep.json").is_file():
        return out
    state = json.loads((exp / "hvae_sweep.json").read_text())
    out.update(gpu_share=state.get("gpu_share"), memory_fraction=state.get("memory_fraction"),
               trial_bytes=state.get("trial_bytes"))
    table = load_trials(exp).to_pylist()
    statuses: dict[str, int] = {}
    for t in table:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    rows = trial_rows(exp)
    startup, gaps, epochs = [], [], 0
    for rs in rows.values():
        good = [x for x in rs if "epoch_time_s" in x and "time_this_iter_s" in x]
        epochs += len(good)
        if good:
            startup.append(good[0]["time_this_iter_s"] - good[0]["epoch_time_s"])
            gaps += [x["time_this_iter_s"] - x["epoch_time_s"] for x in good[1:]]
    done = sum(n for s, n in statuses.items() if s not in ("running", "pending"))
    wall = r.get("run_sweep_s") or r["wall_s"]
    out.update(trials=len(table), trials_done=done, statuses=statuses, epochs_total=epochs,
               trials_per_hour=done / wall * 3600, epochs_per_hour=epochs / wall * 3600,
               trial_startup_s=startup,
               trial_startup_median_s=statistics.median(startup) if startup else None,
               report_gap_median_s=statistics.median(gaps) if gaps else None,
               wall_time_s_per_trial=[t["wall_time_s"] for t in table])
    return out


# --------------------------------------------------------------------------------------------------


def synthetic_file(path: Path, n: int) -> str:
    import numpy as np

    from hvae_ray.data.io import save_parquet
    from hvae_ray.data.jets import from_padded

    rng = np.random.default_rng(0)
    p = np.zeros((n, 30, 3), np.float32)
    mult = rng.integers(10, 31, n)
    p[..., :2] = rng.normal(0, 0.15, (n, 30, 2))
    pt = rng.exponential(1, (n, 30)) * (np.arange(30)[None] < mult[:, None])
    p[..., 2] = pt / pt.sum(1, keepdims=True)
    save_parquet(from_padded(p), path, overwrite=True)
    return str(path)


def f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None,
                   help="jets file (default: synthetic for (a), the sweep file's own data for (b))")
    p.add_argument("--scales", default="250:6", help="JETS:EPOCHS list for the overhead runs")
    p.add_argument("--trial-cpus", type=float, default=0, help="CPUs of the overhead trial (default cores-1)")
    p.add_argument("--sweep", default=str(REPO / "sweeps" / "quickstart.yaml"))
    p.add_argument("--sweep-set", action="append", metavar="KEY=VALUE", help="override a sweep-file key")
    p.add_argument("--gpu-memory-gb", type=float, default=4.0, help="with CUDA: the card size for GPU shares")
    p.add_argument("--trial-memory-mb", default="auto")
    p.add_argument("--gpu-fraction", type=float, default=None, help="with CUDA: a fixed GPU share instead")
    p.add_argument("--no-overhead", dest="overhead", action="store_false")
    p.add_argument("--no-sweep", dest="do_sweep", action="store_false")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per sweep (then killed)")
    p.add_argument("--release-wait", type=float, default=15,
                   help="seconds to wait after a sweep for Ray to free all CPUs/GPUs")
    p.add_argument("--storage", default=None, help="experiment storage (default: a temporary directory)")
    p.add_argument("--json", default=None, metavar="FILE")
    # internal
    p.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jets", type=int, default=250, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--overrides", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare:
        print("RESULT " + json.dumps(bare_worker(args)), flush=True)
        return
    if args.sweep_child:
        print("RESULT " + json.dumps(sweep_child(args)), flush=True)
        return
    if args.trial_memory_mb != "auto":
        args.trial_memory_mb = float(args.trial_memory_mb)

    gpu = GpuSampler.available()
    results: dict = {"argv": sys.argv[1:], "cpu_cores": os.cpu_count(), "cuda": gpu}
    tmp = tempfile.TemporaryDirectory()
    storage = Path(args.storage).resolve() if args.storage else Path(tmp.name)
    storage.mkdir(parents=True, exist_ok=True)

    def released(r: dict) -> str:
        if r.get("resources_still_held"):
            return (f"NOT released {args.release_wait:g} s after the sweep returned: still held "
                    f"{r['resources_still_held']} (placement group left behind)")
        if r.get("resources_released_after_s") is not None:
            return f"all CPUs/GPUs free {r['resources_released_after_s']:.2f} s after the sweep returned"
        return "release n/a"

    if args.overhead:
        scales = [tuple(int(x) for x in s.split(":")) for s in args.scales.split(",") if s]
        data = args.data or synthetic_file(storage / "synthetic.parquet", max(n for n, _ in scales))
        results["overhead"] = []
        for jets, epochs in scales:
            o = overhead(args, data, jets, epochs, storage, gpu)
            results["overhead"].append(o)
            if "bare_error" in o or "epoch_ratio" not in o:
                print(f"overhead {jets} jets: FAILED: {o.get('bare_error') or o.get('ray_error') or o}")
                continue
            b, r, sw = o["bare"], o["ray"], o["sweep"]
            print(f"overhead {jets} jets ({b['device']}, {epochs} epochs, {o['trial_cpus']:g} CPUs): "
                  f"epoch_time_s "
                  f"bare {f(o['bare_epoch_s'])} s, Ray {f(o['ray_epoch_s'])} s, ratio {f(o['epoch_ratio'])}; "
                  f"between reports bare {f(o['bare_interval_s'])} s, Ray {f(o['ray_interval_s'])} s, "
                  f"ratio {f(o['interval_ratio'])} (goal < 1.05 at 10k)")
            print(f"  per-report gap (report interval - epoch_time_s): bare {f(o['bare_report_gap_s'])} s, "
                  f"Ray {f(o['ray_report_gap_s'])} s; start-up to first report less epoch 0: bare "
                  f"{f(b['startup_s'], 2)} s, Ray trial {f(r['startup_s'], 2)} s")
            print(f"  one-trial sweep: ray init {f(sw.get('ray_init_s'), 1)} s, run_sweep "
                  f"{f(sw.get('run_sweep_s'), 1)} s "
                  f"vs bare process total {f(b['total_s'], 1)} s; {released(sw)}")
            tl = sw.get("timeline") or []
            if tl:
                parts = [f"{e['actor']} process {f(e.get('process_start'), 1)}, actor "
                         f"{f(e.get('actor_create'), 1)}-{f(e.get('actor_ready'), 1)}" for e in tl]
                first = r["time_total_s_first"]
                drv = next((e for e in tl if e["actor"] == "ImplicitFunc"), {})
                rep = (drv.get("actor_ready") or 0) + first if first is not None else None
                print(f"  trial timeline (s after run_sweep was called): {'; '.join(parts)}; first report "
                      f"~{f(rep, 1)} (epoch 0 took "
                      f"{f(r['epoch_time_s'][0] if r['epoch_time_s'] else None, 1)})")
            if o.get("ray_error"):
                print(f"  {o['ray_error'][:300]}")

    if args.do_sweep:
        s = results["sweep"] = whole_sweep(args, storage, gpu)
        if "trials" not in s:
            print(f"sweep {s['sweep']}: FAILED: {s.get('error')}: {(s.get('log_tail') or '')[-800:]}")
        else:
            if s.get("error"):
                print(f"sweep {Path(s['sweep']).name}: {s['error']} (partial results below)")
            share = s["gpu_share"]
            mem = s["trial_bytes"] and round(s["trial_bytes"] / 2**20)
            print(f"sweep {Path(s['sweep']).name}: {s['trials_done']}/{s['trials']} trials done "
                  f"({s['statuses']}), "
                  f"{s['epochs_total']} epochs, run_sweep {f(s.get('run_sweep_s'), 1)} s (process wall "
                  f"{s['wall_s']:.1f} s, ray init {f(s.get('ray_init_s'), 1)} s): "
                  f"{s['trials_per_hour']:.0f} trials/hour, "
                  f"{s['epochs_per_hour']:.0f} epochs/hour; GPU share {share}, trial memory {mem} MiB, "
                  f"allocator fraction {s.get('memory_fraction')}")
            print(f"  trial start-up (first report - its epoch_time_s): median "
                  f"{f(s['trial_startup_median_s'], 2)} s "
                  f"(all: {', '.join(f(x, 1) for x in s['trial_startup_s'])}); per-report gap median "
                  f"{f(s['report_gap_median_s'])} s; {released(s)}")
        g = s.get("gpu")
        if g and g.get("util_samples"):
            print(f"  GPU busy: {g['busy_fraction']:.3f} of samples with utilisation > 0, mean utilisation "
                  f"{g['util_mean_pct']:.1f} %, a compute process present in "
                  f"{f(g.get('any_process_fraction'))} "
                  f"of samples (max {g.get('max_concurrent_processes')} at once, peak per process "
                  f"{g.get('process_memory_peak_mib')} MiB, card used peak "
                  f"{g['memory_used_peak_mib']:.0f} MiB)")
        else:
            print("  GPU busy: n/a (no CUDA)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    tmp.cleanup()


if __name__ == "__main__":
    main()
