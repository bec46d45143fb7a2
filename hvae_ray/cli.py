"""hvae-ray: train HyperVAEs on particle jets, sweep their hyperparameters on Ray, sample and evaluate jets.

Each command is a thin layer over ``hvae_ray.api``; a known input error prints one line (the API's
arguments it names shown as this command line's flags) and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from pathlib import Path

from hvae_ray import api
from hvae_ray.errors import HvaeError

#: The API's arguments that error messages name (in backquotes), as this command line's flags.
FLAGS = {"resume=True": "--resume", "save_dir": "--save-dir", "overwrite=True": "--force", "n_jets": "--n-jets",
         "prior": "--prior", "prior='fitted'": "--prior fitted", "prior='standard'": "--prior standard",
         "temperature": "--temperature", "kind": "--kind",
         "components": "--components", "num_eval_samples": "--w1-samples", "fpd_min_samples": "--fpd-min-samples",
         "fpd_max_samples": "--fpd-max-samples", "kpd_batch_size": "--kpd-batch-size", "name": "--name",
         "resume_sweep": "'hvae-ray sweep resume'"}


def _overrides(pairs: list[str] | None) -> dict:
    from hvae_ray.config import parse_override

    return dict(parse_override(p) for p in pairs or [])


def jet_count(text: str) -> int:
    """A number of jets: an integer, also written as a float with an integral value (``1e6``, ``2.5e4``)."""
    import math

    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value != math.floor(value):
        raise argparse.ArgumentTypeError(f"must be a whole number of jets, got {text!r}")
    return int(value)


def cmd_generate(a: argparse.Namespace) -> int:
    out = api.generate_data(a.flavor, a.n_jets, a.out, a.seed, workers=a.workers, overwrite=a.force,
                            progress=not a.quiet)
    print(f"wrote {a.n_jets} {a.flavor} jets to {out}")
    return 0


def _epoch_line(report) -> None:
    """One line per epoch that stays on screen (the progress bar does not): losses, KL, β, W1m, time."""
    from tqdm.auto import tqdm

    from hvae_ray.tracking import EPOCH_LINE

    def shown(key: str, fmt: str) -> str:
        v = report.metrics.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    values = "  ".join(text.format(shown(key, fmt)) for key, text, fmt in EPOCH_LINE)
    tqdm.write(f"epoch {report.epoch + 1:>4}  {values}" + ("  best" if report.is_best else ""))


def cmd_train(a: argparse.Namespace) -> int:
    from hvae_ray.tracking import RUN_SUMMARY

    try:
        result = api.train(a.config, a.data_path, save_dir=a.save_dir, log_dir=a.log_dir, resume=a.resume,
                           save_test_indices=a.save_test_indices, overrides=_overrides(a.set),
                           progress=not a.quiet, callbacks=() if a.quiet else (_epoch_line,))
    except KeyboardInterrupt:
        return _train_interrupted(a)
    print(" ".join(f"{k}={result[k]:.5g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}"
                   for k in RUN_SUMMARY) + f" best_epoch={result['best_epoch'] + 1} (1-based, as epochs_run)")
    print(f"checkpoints: {result['save_dir']}/{{last,best}}  tensorboard: {result['log_dir']}")
    return 0


def train_resume_command(a: argparse.Namespace) -> str:
    """The command that continues this `train` run: the same config, data, folders and overrides, with --resume."""
    import shlex

    parts = ["hvae-ray", "train"]
    for flag, value in (("--config", a.config), ("--data-path", a.data_path), ("--save-dir", a.save_dir),
                        ("--log-dir", a.log_dir)):
        if value is not None:
            parts += [flag, str(value)]
    for pair in a.set or []:
        parts += ["--set", pair]
    parts += ["--save-test-indices"] * bool(a.save_test_indices) + ["--quiet"] * bool(a.quiet) + ["--resume"]
    return shlex.join(parts)


def _train_interrupted(a: argparse.Namespace) -> int:
    """Ctrl+C during `train`: below the progress bar, how to continue from the last saved epoch."""
    from hvae_ray.engine import CHECKPOINT_FILE

    if not a.quiet:
        print(file=sys.stderr)  # off the progress bar's line
    if (Path(a.save_dir) / "last" / CHECKPOINT_FILE).is_file():
        print(f"hvae-ray: interrupted; the last finished epoch is saved in {Path(a.save_dir) / 'last'}; "
              "continue with:", file=sys.stderr)
        print(train_resume_command(a), file=sys.stderr)
    else:
        print("hvae-ray: interrupted before the first epoch ended; nothing was saved to resume from",
              file=sys.stderr)
    return 130


def cmd_sample(a: argparse.Namespace) -> int:
    _at_least_one(a.n_jets, "--n-jets")
    out = api.sample(a.checkpoint, a.n_jets, a.out, seed=a.seed, device=a.device, overwrite=a.force,
                     progress=not a.quiet, prior=a.prior, posterior_of=a.posterior, temperature=a.temperature,
                     report=lambda line: print(in_flags(line), flush=True))
    print(f"wrote {a.n_jets} jets to {out}")
    return 0


def cmd_prior_fit(a: argparse.Namespace) -> int:
    _at_least_one(a.components, "--components")
    path = api.fit_prior(a.checkpoint, a.data_path, kind=a.kind, components=a.components, seed=a.seed,
                         device=a.device, overwrite=a.force)
    print(f"wrote {path}; hvae-ray sample --checkpoint {a.checkpoint} now samples from it "
          "(--prior standard for N(0, 1))")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    sizes = dict(num_eval_samples=a.w1_samples, fpd_min_samples=a.fpd_min_samples,
                 fpd_max_samples=a.fpd_max_samples, kpd_batch_size=a.kpd_batch_size)
    result = api.evaluate(a.real, a.generated, seed=a.seed, per_side=a.per_side, plots_dir=a.plots,
                          log_dir=a.log_dir, overwrite=a.force, **sizes)
    if a.json:
        print(json.dumps(result, indent=2))
        _say_where_plots_went(a)
        return 0
    r, same_n = result, result["n_per_side"] > 0
    print(f"{'metric':<14}{'generated':>22}{'real-vs-real floor':>24}" + (f"{'ratio':>9}" if same_n else ""))
    for key in [k for k in result if f"{k}_floor" in result]:
        val, err = result[key], result.get(f"{key}_err", float("nan"))
        fl, fl_err = result[f"{key}_floor"], result.get(f"{key}_floor_err", float("nan"))
        ratio = f"{result[f'{key}_ratio']:>9.3g}" if same_n else ""
        print(f"{key:<14}{val:>13.4g} ± {err:<7.2g}{fl:>15.4g} ± {fl_err:<7.2g}{ratio}")
    print(f"convention: {r['convention']} (z = pT_rel as given; the values compare with papers that use "
          f"jetnet, at their sample sizes)")
    if same_n:
        scale = "the papers' scale" if r["n_per_side"] == 50_000 else "papers compare 50,000 per side"
        print(f"jets: {r['n_per_side']} generated against {r['n_per_side']} real; floor: those real jets "
              f"against {r['n_per_side']} others ({scale}; files hold {r['n_real']} real, {r['n_gen']} generated)")
    else:
        print(f"jets: real {r['n_real']} (floor: two halves of {r['n_floor']}), generated {r['n_gen']}; "
              f"no ratios: the value and the floor are at different N")
    print(f"subsamples with replacement: W1 {r['w1_num_batches']} × {r['w1_eval_samples']} jets; "
          f"FPD {r['fpd_num_points']} sizes {r['fpd_min_samples']}–{r['fpd_max_samples']} × "
          f"{r['fpd_num_batches']}; KPD {r['kpd_num_batches']} × {r['kpd_batch_size']}")
    if r["small_sample"]:
        print("note: fewer jets than the largest subsample (jetnet recommends 50,000): every value and "
              "floor carries the sets' finite-sample effect; compare a value with its floor")
    _say_where_plots_went(a)
    return 0


def _say_where_plots_went(a: argparse.Namespace) -> None:
    """evaluate's figures: where they were written (stderr, so that --json stays one document)."""
    from hvae_ray.evaluation.plots import FIGURE_KEYS

    if a.plots is not None:
        print(f"plots: {len(FIGURE_KEYS)} real-vs-generated figures in {a.plots}", file=sys.stderr)
    if a.log_dir is not None:
        print(f"plots: in TensorBoard under {a.log_dir} (tensorboard --logdir {a.log_dir}, group Evaluate)",
              file=sys.stderr)


def _sweep_console(a: argparse.Namespace) -> None:
    """--verbose: Ray's own console output (result boxes, progress tables) instead of the sweep's lines."""
    if a.verbose:
        import os

        from hvae_ray.sweep.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"


def cmd_sweep_run(a: argparse.Namespace) -> int:
    _sweep_console(a)
    res = api.run_sweep(a.sweep, overrides=_overrides(a.set), name=a.name, storage=a.storage, address=a.address,
                        on_start=_announce_sweep, hint=False)
    return _report_sweep(res)


#: The experiment a sweep command announced (for the resume hint if it is interrupted before its end).
_announced: list[Path] = []


def _announce_sweep(experiment_dir: Path) -> None:
    _announced.append(experiment_dir)
    print(f"experiment: {experiment_dir}\nwatch it:   tensorboard --logdir {experiment_dir}", flush=True)


def _report_sweep(res) -> int:
    """The sweep's end: its trials, and 130 (143 after SIGTERM) with the resume command when it was
    interrupted."""
    import signal

    if res.interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping: Ray shuts down at exit, uninterrupted
        _print_interrupted(res, res.outcome())
        return 143 if res.signal == signal.SIGTERM else 130
    print(f"experiment: {res.experiment_dir}")
    print(f"trials: {res.summary()}")
    print(f"inspect: hvae-ray trials {res.experiment_dir}")
    return 0


def cmd_sweep_resume(a: argparse.Namespace) -> int:
    _sweep_console(a)
    return _report_sweep(api.resume_sweep(a.experiment_dir, address=a.address, on_start=_announce_sweep, hint=False))


def cmd_sweep_sign(a: argparse.Namespace) -> int:
    files = api.sign_experiment(a.experiment_dir)
    print(f"signed {len(files)} files of {a.experiment_dir} with your key; `sweep resume` will load them")
    return 0


def cmd_trials(a: argparse.Namespace) -> int:
    _at_least_one(a.top, "--top")
    table = api.load_trials(a.experiment_dir)
    if a.report:
        print(f"wrote the report of {table.num_rows} trials to {api.write_report(a.experiment_dir, a.report)}")
        return 0
    if a.best:
        print(api.best_config_yaml(table, a.experiment_dir, metric=a.sort), end="")
        return 0
    table = api.sort_trials(table, a.experiment_dir, metric=a.sort)
    if a.top:
        table = table.slice(0, a.top)
    if a.export:
        path = api.export_trials(table, a.export)
        print(f"wrote {table.num_rows} trials to {path}")
    columns = [c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None
    print(api.format_trials(table, columns=columns, metric=api.sweep_metric(a.experiment_dir)))
    return 0


def _at_least_one(value: int | None, flag: str) -> None:
    from hvae_ray.errors import ConfigError

    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be >= 1, got {value}")


def _add_data(sub) -> None:
    from hvae_ray.data.generate import FLAVORS

    data = sub.add_parser("data", help="make jet datasets").add_subparsers(dest="data_command", required=True)
    g = data.add_parser("generate", help="generate jets with Pythia 8 + FastJet (JetNet recipe) into Parquet")
    g.add_argument("--flavor", required=True, choices=FLAVORS, help="the jet's initiating particle")
    g.add_argument("--n-jets", type=jet_count, required=True, help="number of jets to keep (1e5 style accepted)")
    g.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    g.add_argument("--out", required=True, help="output .parquet file")
    g.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    g.add_argument("--force", action="store_true", help="overwrite an existing output file")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a HyperVAE")
    t.add_argument("--config", default=None, help="config YAML (default: the built-in defaults)")
    t.add_argument("--data-path", default=None,
                   help="jets (.parquet, .npz, .h5, .pt); default: 1000 q jets generated once and cached")
    t.add_argument("--save-dir", default="runs/train",
                   help="checkpoints go to SAVE_DIR/{last,best} (default: runs/train)")
    t.add_argument("--log-dir", default=None, help="TensorBoard directory (default: SAVE_DIR/tb)")
    t.add_argument("--save-test-indices", action="store_true",
                   help="also write the test split's jet indices to SAVE_DIR/test_indices.npy")
    t.add_argument("--resume", action="store_true", help="continue from SAVE_DIR/last")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (dotted)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="generate jets from a trained model")
    s.add_argument("--checkpoint", required=True, help="a checkpoint folder, e.g. runs/train/best")
    s.add_argument("--n-jets", type=jet_count, required=True,
                   help="jets to generate (streamed to disk in chunks; 1e5 style accepted)")
    s.add_argument("--out", required=True, help="output .npz (particle_features [N, 30, 4])")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    s.add_argument("--prior", choices=api.PRIORS, default=None,
                   help="codes from N(0, 1) or from the prior of `prior fit` in the checkpoint folder (default: "
                        "that prior when the folder holds one, else N(0, 1))")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="--prior fitted: scale of the prior's random draws (below 1: fewer codes from its tails)")
    s.add_argument("--posterior", default=None, metavar="JETS",
                   help="decode one draw of q(z|x) of each of the first N jets of this file instead "
                        "(the model's reconstructions: the bound for any prior)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)


def _add_prior(sub) -> None:
    pr = sub.add_parser("prior", help="latent priors of a trained model").add_subparsers(dest="prior_command",
                                                                                         required=True)
    f = pr.add_parser("fit", help="fit a Gaussian mixture (or a flow) to the training jets' latent codes")
    f.add_argument("--checkpoint", required=True, help="a checkpoint folder, e.g. runs/train/best")
    f.add_argument("--data-path", default=None,
                   help="the jets the model was trained on (default: the default sample, as train)")
    f.add_argument("--kind", choices=("gmm", "flow"), default="gmm",
                   help="gmm: a diagonal Gaussian mixture on posterior means (default); flow: a RealNVP flow "
                        "on posterior draws")
    f.add_argument("--components", type=int, default=100, help="mixture components of --kind gmm (default 100)")
    f.add_argument("--seed", type=int, default=0, help="fit seed (default 0)")
    f.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    f.add_argument("--force", action="store_true", help="replace an existing prior")
    f.set_defaults(func=cmd_prior_fit)


def _per_side_arg(text: str) -> int | str:
    """``auto``, ``all`` or a number of jets (``5e4`` style accepted)."""
    return text if text in ("auto", "all") else jet_count(text)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="generation metrics of generated vs real jets, as jetnet 0.2.5")
    e.add_argument("--real", required=True, help="real jets (.parquet, .npz, .h5, .pt)")
    e.add_argument("--generated", required=True, help="generated jets, e.g. the .npz of `sample`")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    e.add_argument("--seed", type=int, default=42, help="subsample seed (42: jetnet's default)")
    e.add_argument("--per-side", type=_per_side_arg, default="auto", metavar="N|auto|all",
                   help="N generated against N real jets, floor against N more real jets, ratios to the floor "
                        "(auto, the default: as many as the files allow; papers use 50000); all: every jet, "
                        "floor from two halves of the real ones")
    e.add_argument("--w1-samples", type=int, default=50_000, metavar="N",
                   help="jets per W1 subsample (default 50000, jetnet's)")
    e.add_argument("--fpd-min-samples", type=int, default=20_000, metavar="N",
                   help="smallest FPD subsample (default 20000, jetnet's)")
    e.add_argument("--fpd-max-samples", type=int, default=50_000, metavar="N",
                   help="largest FPD subsample (default 50000, jetnet's)")
    e.add_argument("--kpd-batch-size", type=int, default=5000, metavar="N",
                   help="jets per KPD batch (default 5000, jetnet's)")
    e.add_argument("--plots", default=None, metavar="DIR", help="write real-vs-generated PNGs here")
    e.add_argument("--force", action="store_true", help="replace plots already in DIR")
    e.add_argument("--log-dir", default=None, help="also write the plots to TensorBoard here")
    e.set_defaults(func=cmd_evaluate)


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="hyperparameter sweeps on Ray").add_subparsers(dest="sweep_command",
                                                                                      required=True)
    r = sw.add_parser("run", help="run a sweep file")
    r.add_argument("sweep", help="sweep YAML, e.g. sweeps/quickstart.yaml")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a sweep key (dotted)")
    r.add_argument("--name", default=None, help="experiment name (default: the file's name and a timestamp)")
    r.add_argument("--storage", default=None,
                   help="folder (or shared mount) for experiments (default: the sweep file's storage, runs/sweeps)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    r.add_argument("--verbose", action="store_true", help="Ray Tune's own output instead of one line per trial event")
    r.set_defaults(func=cmd_sweep_run)
    rs = sw.add_parser("resume", help="resume an interrupted sweep")
    rs.add_argument("experiment_dir", help="the folder `sweep run` printed")
    rs.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    rs.add_argument("--verbose", action="store_true", help="Ray Tune's own output instead of one line per trial event")
    rs.set_defaults(func=cmd_sweep_resume)
    sg = sw.add_parser("sign", help="trust an experiment's saved state as it is now (resume refuses state "
                                    "your own sweeps did not sign)")
    sg.add_argument("experiment_dir", help="the folder `sweep run` printed")
    sg.set_defaults(func=cmd_sweep_sign)


def _add_trials(sub) -> None:
    tr = sub.add_parser("trials", help="the trial table of a sweep")
    tr.add_argument("experiment_dir", help="the folder `sweep run` printed")
    tr.add_argument("--sort", default=None,
                    help="a metric (its best value) or any column the table shows (default: the sweep's metric)")
    tr.add_argument("--columns", default=None, metavar="A,B,...",
                    help="columns to show, comma-separated (names as in the header or the export)")
    tr.add_argument("--top", type=int, default=None, help="show only the N best trials")
    tr.add_argument("--export", default=None, metavar="FILE", help=".parquet or .csv")
    tr.add_argument("--best", action="store_true", help="print the best trial's config as YAML")
    tr.add_argument("--report", default=None, metavar="FILE",
                    help="write a self-contained HTML page of the sweep (best so far, parallel coordinates, "
                         "parameter importance, learning curves, the best trial's jets)")
    tr.set_defaults(func=cmd_trials)


def build_parser() -> argparse.ArgumentParser:
    from hvae_ray import __version__

    p = argparse.ArgumentParser(prog="hvae-ray", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"hvae-ray {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_train, _add_sample, _add_prior, _add_evaluate, _add_sweep, _add_trials):
        add(sub)
    return p


def in_flags(message: str) -> str:
    """An error message with the API arguments it names (in backquotes) as this command line's flags."""
    return re.sub(r"`([^`]+)`", lambda m: FLAGS.get(m.group(1), m.group(0)), message)


#: A write that failed for want of room or of a writable file system.
_WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HvaeError as e:
        print(f"hvae-ray: error: {in_flags(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _WRITE_FAULTS:
            raise
        # A write that the command did not turn into a line of its own (a full disk, a read-only file
        # system, a file-size limit): the line io_safe gives for one.
        from hvae_ray.io_safe import write_failed

        print(f"hvae-ray: error: {write_failed(e.filename or 'an output file', e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        import signal

        # Stopping: a further Ctrl+C must not break Ray's shutdown at exit into a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = 143 if type(e).__name__ == "Terminated" else 130
        if _announced and _report_interrupted(_announced[-1]):
            return code
        print("hvae-ray: interrupted", file=sys.stderr)
        if _announced:
            print(f"continue with: hvae-ray sweep resume {_announced[-1]}", file=sys.stderr)
        return code


def _report_interrupted(experiment_dir: Path) -> bool:
    """A sweep stopped before Tune handed back its results (a repeated Ctrl+C): the same summary as
    :func:`_report_sweep`, read from the experiment's own files. False when they cannot be read."""
    from hvae_ray.sweep.tune import SweepResult

    try:
        res = SweepResult(experiment_dir, None)
        outcome = res.outcome()
    except Exception:  # noqa: BLE001 - a half-written experiment: the plain hint below serves
        return False
    _print_interrupted(res, outcome)
    return True


def _print_interrupted(res, outcome: dict[str, list[str]]) -> None:
    """An interrupted sweep's trials, what finished and what did not, and how to resume it."""
    print(f"experiment: {res.experiment_dir}")
    print(f"trials: {res.summary()}")
    for kind, ids in outcome.items():
        print(f"  {kind}: {len(ids)}" + (f" ({', '.join(ids)})" if ids else ""))
    print(f"interrupted; continue with: hvae-ray sweep resume {res.experiment_dir}")


if __name__ == "__main__":
    sys.exit(main())
