"""Sweep-level costs, each sweep in a child process with its own Ray instance and a time limit. Run it alone.

overhead  per --scales JETS:EPOCHS, bare engine.fit against a one-trial sweep per --workers count: epoch time,
          report interval, start-up, each Ray actor's start, whether Ray frees its CPUs/GPUs; x_one_worker: the
          data-parallel speed-up (goal >= 1.8 on 2 GPUs at 100k jets).
sweep     --sweep FILE (+ --sweep-set): wall time, trials and epochs per hour, jets/s, trial start-up, report gaps,
          GPU share, trial memory, GPU busy fraction, trial table, best trial's curve; --one-device: x_one_device
          (goal >= 1.9 on 2 GPUs); --evaluate HELDOUT scores --gen-jets jets of the best trial; --modes off,auto:
          the sweep once per resources.population value, in that order, with x_wall against the first and each
          trial's epochs (the rung ASHA stopped it at) side by side.
"""

import json
import os
import re
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import psutil
import torch
import yaml
from harness import fmt, median, ratio

from hvae_ray import api, load_config, load_trials
from hvae_ray.data.io import load_jets, save_parquet
from hvae_ray.engine import split_indices
from hvae_ray.sweep.layout import TrialPaths, is_experiment, read_jsonl, read_sweep_state, trial_paths


def actor_timeline(logs: Path, t0: float) -> list[dict]:
    """When each trial driver (ImplicitFunc), TrainController and RayTrainWorker process started, created its
    actor and finished constructing it, in s after ``t0``, from Ray's worker logs."""
    out, stamp = [], re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
    marks = (("process_start", ""), ("actor_create", "Creating actor"), ("actor_ready", "Actor creation task finished"))
    for f in logs.glob("worker-*.out"):
        name = next((x.split(":", 2)[2] for x in f.read_text(errors="replace").splitlines()[:3]
                     if x.startswith(":actor_name:")), None)
        core = next(logs.glob(f"python-core-worker-*_{f.stem.rsplit('-', 1)[-1]}.log"), None)
        if name not in ("ImplicitFunc", "TrainController", "RayTrainWorker") or core is None:
            continue
        out.append(ev := {"actor": name})
        for line in core.read_text(errors="replace").splitlines():
            if m := stamp.match(line):  # the first stamped line, then the first line with each of the other marks
                t = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000 - t0
                ev.update({k: t for k, mark in marks if mark in line and k not in ev})
    return sorted(out, key=lambda e: e.get("actor_create", e.get("process_start", 0)))


def sweep_child(sweep: str, overrides: dict, name: str, storage: str, release_wait: float) -> dict:
    """A Ray instance of its own and one run_sweep call: what Ray saw, when each actor came up, the process groups
    set up, then how long until every CPU/GPU was free again (a placement group left behind would show)."""
    import ray

    from hvae_ray.sweep.tune import ray_init, run_sweep

    t = time.perf_counter()
    ctx, total = ray_init(None), ray.cluster_resources()
    raylets = [p.info["cmdline"] or [] for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "raylet"]
    out: dict = {"ray_init_s": time.perf_counter() - t, "ray_cpus": total.get("CPU", 0.0),
                 "ray_gpus": total.get("GPU", 0.0), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "ray_instances_on_host": len({x for c in raylets for x in c if x.startswith("--gcs-address=")})}
    t, out["t0"] = time.perf_counter(), time.time()
    r = run_sweep(sweep, overrides or None, name=name, storage=storage)
    out.update(run_sweep_s=time.perf_counter() - t, t1=time.time(), experiment_dir=str(r.experiment_dir))
    try:
        logs = Path(ctx.address_info["session_dir"]) / "logs"
        out["timeline"] = actor_timeline(logs, out["t0"])
        out["process_groups"] = sorted(x.split("for: ", 1)[-1].strip() for f in logs.glob("worker-*.*") for x in
                                       f.read_text(errors="replace").splitlines() if "Setting up process group" in x)
    except Exception as e:  # noqa: BLE001 - log layout differs: no timeline
        out["timeline_error"] = repr(e)
    t, held = time.perf_counter(), {}
    while time.perf_counter() - t < release_wait:
        avail = ray.available_resources()
        held = {k: round(total[k] - avail.get(k, 0.0), 4) for k in ("CPU", "GPU")
                if total.get(k, 0) - avail.get(k, 0) > 1e-6}
        if not held:
            break
        time.sleep(0.25)
    return out | {"resources_released_after_s": None if held else time.perf_counter() - t, "resources_still_held": held}


def run(a, sweep, overrides: dict, label: str, storage: Path, env: dict | None = None) -> dict:
    """One sweep in a child process, with the GPU sampled, each trial's rows and the timing over them."""
    name = f"{label}-{int(time.time())}"
    kw = dict(sweep=str(sweep), overrides=overrides, name=name, storage=str(storage), release_wait=a.release_wait)
    harness.say(f"sweep {label}: {Path(sweep).name} {json.dumps(overrides)} {json.dumps(env or {})}")
    with harness.GpuSampler() as gpu:
        t = time.time()
        r = harness.Child(sweep_child, kw, timeout=a.timeout, env=env, log=storage / f"{name}.log").result()
    r.update(label=label, env=env or {}, gpu=gpu.window(r.get("t0", t), r.get("t1", time.time())))
    exp = Path(r.setdefault("experiment_dir", str(storage / name)))
    r["trials"] = {t.root.name: [x for x in read_jsonl(t.results) if "epoch_time_s" in x]
                   for t in (trial_paths(exp) if exp.is_dir() else [])}
    runs = [x for x in r["trials"].values() if x]
    later = [x for rs in runs for x in rs[1:]]  # the first epoch of each trial carries its start-up
    timed = [x for x in later if "time_this_iter_s" in x]
    tune = [x.get("time_this_iter_s", float("nan")) - x["epoch_time_s"] for x, *_ in runs]
    crit = [x["reported_at"] - x["worker_started_at"] - x["epoch_time_s"] for x, *_ in runs if "worker_started_at" in x]
    gaps = [y["reported_at"] - x["reported_at"] - y["epoch_time_s"] for rs in runs for x, y in zip(rs, rs[1:])
            if "reported_at" in y]
    r.update(epochs_total=sum(map(len, r["trials"].values())), tune_startup_s=tune, critical_startup_s=crit,
             tune_startup_median_s=median(tune), critical_startup_median_s=median(crit),
             report_gap_median_s=median(gaps), epoch_time_median_s=median([x["epoch_time_s"] for x in later]),
             tune_report_gap_median_s=median([x["time_this_iter_s"] - x["epoch_time_s"] for x in timed]),
             interval_median_s=median([x["time_this_iter_s"] for x in timed]),
             ray_cpus_gpus=[r.get("ray_cpus"), r.get("ray_gpus")],
             released=r.get("resources_still_held") or r.get("resources_released_after_s"),
             **{k: r["gpu"][k] for k in ("busy_fraction", "util_mean_pct", "used_peak_mib", "process_peak_mib")})
    harness.say(f"  {label}: {r['epochs_total']} epochs in {len(r['trials'])} trials, {fmt(r.get('run_sweep_s'))} s"
                + (f"; FAILED: {r['error']}" if "error" in r else ""))
    return r


def overhead(a, storage: Path, cuda: bool) -> list[dict]:
    out, cores, scales = [], os.cpu_count() or 1, [[int(x) for x in s.split(":")] for s in a.scales.split(",")]
    data = str(Path(a.data).resolve() if a.data else storage / "synthetic.parquet")
    if not a.data:  # synthetic jets, as many as the largest scale has
        save_parquet(harness.load_sample(None, max(jets for jets, _ in scales)), data, overwrite=True)
    for jets, epochs in scales:
        bare = {}
        if "bare" not in a.skip:
            cpus = int(a.trial_cpus or max(1, cores - 1))  # Ray gives a worker OMP_NUM_THREADS = its CPUs
            harness.say(f"bare engine.fit: {jets} jets x {epochs} epochs, {cpus} threads")
            b = harness.Child(harness.fit_child, dict(data=data, jets=jets, epochs=epochs, sets=a.set),
                              timeout=a.timeout, env={"OMP_NUM_THREADS": str(cpus)}).result()
            out.append(bare := {**b, "label": f"bare {jets}x{epochs}", "run_sweep_s": b.get("total_s"),
                                "epoch_time_median_s": median(b.get("epoch_time_s", [])[1:]),
                                "interval_median_s": median(b.get("interval_s", [])[1:]),
                                "tune_startup_median_s": b.get("startup_s")})
        for w in (int(x) for x in a.workers.split(",")):
            label, f = f"{jets}x{epochs}_{w}w", storage / f"{jets}x{epochs}_{w}w.yaml"
            f.write_text(yaml.safe_dump({  # one trial: no search space, an ASHA that never stops it
                "name": label, "config": {"epochs": epochs, "data.max_jets": jets, **harness.parse_sets(a.set)},
                "num_samples": 1, "scheduler": {"max_t": epochs, "grace_period": epochs}, "resources": {
                    "num_workers": w, "cpus_per_worker": a.trial_cpus or max(0.9, (cores - 1) / w),
                    "gpu_fraction": a.overhead_gpu_fraction if cuda else 0,
                    "backend": "auto" if w == 1 else "nccl" if cuda else "gloo"},
                "data": {"path": data}, "storage": str(storage)}))
            r = run(a, f, {}, label, storage)
            one = next((x["epoch_time_median_s"] for x in out if x["label"] == label[:-2] + "1w"), None)
            out.append({**r, "x_bare_epoch": ratio(r["epoch_time_median_s"], bare.get("epoch_time_median_s")),
                        "x_bare_interval": ratio(r["interval_median_s"], bare.get("interval_median_s")),
                        "x_one_worker": ratio(one, r["epoch_time_median_s"])})
    return out


def summarise(r: dict) -> dict:
    """A finished sweep's trial table, jets trained, rates and best trial's curve."""
    if not is_experiment(exp := r["experiment_dir"]):
        return {}
    state = read_sweep_state(exp)
    n_file, table = len(load_jets(state.data_path)), load_trials(exp).to_pylist()
    params, rows = [c for c in (table[0] if table else {}) if c.startswith("param.")], []
    for t in table:
        paths = TrialPaths(Path(t["trial_dir"]))
        cfg = load_config(paths.engine / "config.yaml") if (paths.engine / "config.yaml").is_file() else None
        kl = [x["val_kl"] for x in read_jsonl(paths.metrics_log) if "val_kl" in x][-10:]
        n = len(split_indices(min(cfg.data.max_jets or n_file, n_file), cfg)[0]) if cfg else 0
        rows.append({**{k: t.get(k) for k in ("trial_id", "status", *params, "best_val_objective", "last_val_kl",
                                               "epochs", "wall_time_s", "error", "best_checkpoint", "trial_dir")},
                     "loss_weights": cfg.to_dict().get("loss_weights") if cfg else None, "train_jets": n,
                     "jets_trained": n * len(r["trials"].get(paths.root.name, [])),
                     "kl_slope_last10": float(np.polyfit(np.arange(len(kl)), kl, 1)[0]) if len(kl) >= 3 else None})
    statuses = {s: sum(t["status"] == s for t in table) for s in {t["status"] for t in table}}
    wall = r.get("run_sweep_s") or r["child_s"]
    done = sum(n for s, n in statuses.items() if s not in ("running", "pending"))
    s = {"params": params, "table": rows, "statuses": statuses, "gpu_share": state.gpu_share, "wall_s": wall,
         "trial_memory_mib": (state.trial_bytes or 0) / harness.MiB or None, "trials_done": done,
         "context_mib": (state.context_bytes or 0) / harness.MiB or None, "trials_per_hour": done / wall * 3600,
         "epochs_per_hour": r["epochs_total"] / wall * 3600, "jets_per_s": sum(t["jets_trained"] for t in rows) / wall}
    scored = [t for t in rows if t.get("best_val_objective") is not None]
    if best := min(scored, key=lambda t: t["best_val_objective"], default=None):
        log = [x for x in read_jsonl(TrialPaths(Path(best["trial_dir"])).metrics_log) if "epoch" in x]
        s["best"] = {**best, **{k: [x.get(k) for x in log] for k in ("epoch", "val_kl", "train_total")}}
    return s


def markdown(res: dict) -> list[str]:
    cols = ("epochs_total epoch_time_median_s interval_median_s tune_startup_median_s critical_startup_median_s "
            "report_gap_median_s tune_report_gap_median_s run_sweep_s ray_cpus_gpus released busy_fraction "
            "util_mean_pct used_peak_mib process_peak_mib")
    ov, sw, ev = res.get("overhead", []), res.get("sweeps", []), res.get("evaluate", {})
    md = [harness.table(ov, f"label {cols} x_bare_epoch x_bare_interval x_one_worker error",
                        "Ray overhead: bare engine.fit against one-trial sweeps (medians, first epoch excluded; "
                        "x_one_worker: the data-parallel speed-up, goal >= 1.8 with 2 GPUs)")]
    md += [f"{r['label']} timeline (s after run_sweep): " + "; ".join(
        f"{e['actor']} {fmt(e.get('process_start'))} / {fmt(e.get('actor_create'))} / {fmt(e.get('actor_ready'))}"
        for e in r["timeline"]) + f"; process groups {r.get('process_groups')}" for r in ov if r.get("timeline")]
    for r in sw:
        r["x_one_device"] = ratio(r.get("jets_per_s"), sw[-1].get("jets_per_s")) if r is not sw[-1] else None
        r["x_wall"] = ratio(sw[0].get("wall_s"), r.get("wall_s"))
    md.append(harness.table(sw, "label trials_done statuses wall_s x_wall trials_per_hour epochs_per_hour jets_per_s "
                                f"x_one_device gpu_share trial_memory_mib {cols} error",
                            f"Sweep {res.get('sweep')} {json.dumps(res.get('sweep_overrides'))} (x_one_device: "
                            "goal >= 1.9 with 2 GPUs)"))
    if len(sw) > 1 and all(r.get("table") for r in sw):  # each trial by its index in the sweep, in every run
        by = [{t["trial_id"].rsplit("_", 1)[-1]: t for t in r["table"]} for r in sw]
        md.append(harness.table([{"trial": k, **{f"{r['label']}": f"{b[k]['status']} {b[k]['epochs']}"
                                                 for r, b in zip(sw, by) if k in b}} for k in sorted(by[0])],
                                ["trial", *(r["label"] for r in sw)], "Each trial's status and epochs per run"))
    if best := (sw or [{}])[0].get("best"):
        md.append(harness.table(sorted(sw[0]["table"], key=lambda t: t["best_val_objective"] or 1e300),
                                ["trial_id", "status", *sw[0]["params"], "loss_weights", "best_val_objective",
                                 "last_val_kl", "kl_slope_last10", "epochs"], "Trials"))
        md.append(harness.table([dict(zip(("epoch", "val_kl", "train_total"), x)) for x in
                                 zip(best["epoch"], best["val_kl"], best["train_total"])][-8:],
                                "epoch val_kl train_total", f"Best trial {best['trial_id']}, last epochs"))
    if m := ev.get("metrics"):
        md.append(harness.table([{"metric": k, "generated": m[k], "err": m.get(k + "_err"),
                                  "floor": m.get(k + "_floor"), "floor_err": m.get(k + "_floor_err")}
                                 for k in harness.METRICS], "metric generated err floor floor_err",
                                f"Best trial: {m.get('n_gen')} generated vs {m.get('n_real')} held-out jets: "
                                + "; ".join(f"`{c}`" for c in ev["commands"])))
    return [*md, f"evaluate: {ev['error']}" if ev.get("error") else ""]


def main() -> None:
    a = harness.parser(
        __doc__, "data", "set", "out", "skip", scales="250:6", workers="1", trial_memory_mb="auto", gen_jets=10000,
        sweep=str(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"),
        trial_cpus=(0.0, "CPUs per worker (default cores-1, over the workers)"),
        overhead_gpu_fraction=(1.0, "GPU share of each overhead worker"), sweep_set=([], "override a sweep-file key"),
        gpu_memory_gb=(4.0, "with CUDA: the card size trials are sized for"),
        gpu_fraction=(float, "with CUDA: a fixed GPU share instead"),
        one_device=(False, "run the sweep again on one GPU (CPU) only"),
        modes=(str, "run the sweep once per resources.population value (e.g. off,auto)", "MODES"),
        evaluate=(str, "evaluate the best trial against these jets", "HELDOUT"),
        timeout=(900.0, "seconds allowed per sweep (then killed)"),
        release_wait=(15.0, "seconds to wait for Ray to free all CPUs/GPUs"),
        storage=(str, "experiment storage, kept (default: a temporary directory)")).parse_args()
    cuda, tmp, res = torch.cuda.is_available(), tempfile.TemporaryDirectory(), {"host": harness.host()}
    storage = Path(a.storage or tmp.name).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    if "overhead" not in a.skip:
        res["overhead"] = overhead(a, storage, cuda)
        harness.save(a, res)
    if "sweep" not in a.skip:
        n = (yaml.safe_load(Path(a.sweep).read_text()).get("data") or {}).get("n_jets", 1000)
        ov = {"data.path": str(Path(a.data).resolve()), "config.data.max_jets": int(n)} if a.data else {}
        ov.update({"resources.gpu_fraction": a.gpu_fraction if cuda else 0, "resources.gpu_memory_gb": None}
                  if a.gpu_fraction is not None or not cuda else
                  {"resources.gpu_fraction": None, "resources.gpu_memory_gb": a.gpu_memory_gb,
                   "resources.trial_memory_mb": yaml.safe_load(a.trial_memory_mb)})
        if a.one_device and not cuda:  # a trial must fit on the one CPU: its worker and the trial driver's 0.01
            ov["resources.cpus_per_worker"] = 0.9
        ov.update(harness.parse_sets(a.sweep_set))
        res.update(sweep=a.sweep, sweep_overrides=ov, sweeps=[])
        one = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]} if cuda else {
            "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 1})}
        runs = [(f"population {m}", {"resources.population": int(m) if m.isdigit() else m}, {})
                for m in a.modes.split(",")] if a.modes else [("all devices", {}, {})]
        runs += [("one device", {}, one)] if a.one_device else []
        for label, mode, env in runs:
            r = run(a, a.sweep, {**ov, **mode}, label.replace(" ", "_"), storage, env)
            res["sweeps"].append({**r, **summarise(r)})
            harness.save(a, res)
        if a.evaluate and not (best := res["sweeps"][0].get("best")):
            res["evaluate"] = {"error": "no trial has a best checkpoint"}
        elif a.evaluate:  # --gen-jets jets of the best trial against HELDOUT
            gen, dev, ckpt = storage / "generated.npz", "cuda" if cuda else "cpu", best["best_checkpoint"]
            sample_s = harness.clock(api.sample, ckpt, a.gen_jets, gen, device=dev, overwrite=True)[1]
            m, evaluate_s = harness.clock(api.evaluate, a.evaluate, gen)
            res["evaluate"] = {"metrics": m, "sample_s": sample_s, "evaluate_s": evaluate_s, "commands": [
                f"hvae-ray sample --checkpoint {ckpt} --n-jets {a.gen_jets} --out {gen} --device {dev}",
                f"hvae-ray evaluate --real {a.evaluate} --generated {gen} --json"]}
    harness.save(a, res, *markdown(res))
    tmp.cleanup()


if __name__ == "__main__":
    main()
