"""A sweep's report: one self-contained HTML page (every plot an inline PNG, no script, no link out) of
an experiment directory, read through its trial table (:func:`hvae_ray.sweep.trials.load_trials`).

Sections, in order:

- best-so-far: the sweep metric's best value over the trials, in the order they were created;
- parallel coordinates: each searched key and the metric, one line per trial, keys sampled
  ``loguniform`` on log axes, choices on evenly spaced ticks;
- parameter importance: optuna's fANOVA evaluator (:class:`optuna.importance.FanovaImportanceEvaluator`,
  random forests of scikit-learn) on a study built from the table, one trial per scored row, each
  key with the distribution the sweep sampled it from;
- learning curves: the metric per epoch of the best trials, the last epoch of a trial ASHA stopped
  marked;
- the best trial's jets: its best checkpoint decodes jets from N(0, 1), compared with the trial's own
  validation jets (the split its config makes of the sweep's data file) in particle η_rel, φ_rel,
  pT_rel and the relative jet mass, each with a generated/real ratio panel and its W1 in the title.

Every number the page shows is the table's (trial ids, best values, statuses).
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hvae_ray.errors import DataError

#: Trials drawn in the learning curves (the best by the sweep's metric).
TOP_CURVES = 8
#: Real jets compared at most (a seeded subset of a larger validation split), and generated jets at least.
MAX_REAL_JETS = 20_000
MIN_GENERATED_JETS = 1_000
#: Statuses whose trials stopped before max_t by the scheduler's decision.
STOPPED = ("early_stopped",)
DPI = 110

SECTIONS = ("best-so-far", "parallel-coordinates", "importance", "learning-curves", "distributions")


# ---------------------------------------------------------------------------------------------------------
# The page


def write_report(experiment_dir: str | Path, out_path: str | Path, *, seed: int = 0, device: str = "cpu") -> Path:
    """Write the report of ``experiment_dir`` to ``out_path`` (an .html file, replaced atomically) and
    return its path. DataError when the folder is not an experiment or no trial has reported the
    sweep's metric. ``seed`` draws the generated jets; ``device`` decodes them."""
    from hvae_ray.io_safe import atomic_write_text, write_failed
    from hvae_ray.sweep.layout import read_sweep_state
    from hvae_ray.sweep.trials import load_trials

    exp = Path(experiment_dir).resolve()
    out = Path(out_path)
    if out.suffix.lower() not in (".html", ".htm"):
        from hvae_ray.errors import ConfigError

        raise ConfigError(f"{out}: the report is an HTML page; name it .html")
    state = read_sweep_state(exp)
    table = load_trials(exp)
    rows = table.to_pylist()
    column = f"best_{state.metric}"
    scored = [r for r in rows if _finite(r.get(column))]
    if not scored:
        raise DataError(f"{exp}: no trial has reported {state.metric} yet; nothing to report")
    sign = 1.0 if state.mode == "min" else -1.0
    ranked = sorted(scored, key=lambda r: sign * r[column])
    page = _page(exp, state, rows, ranked, column, seed, device)
    try:
        return atomic_write_text(out, page)
    except OSError as e:
        raise write_failed(out, e) from None


def _page(exp: Path, state, rows: list[dict], ranked: list[dict], column: str, seed: int, device: str) -> str:
    best = ranked[0]
    keys = state.searched_keys
    space = state.spec.search_space
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    direction = "lower is better" if state.mode == "min" else "higher is better"
    best_params = "".join(f" · {_e(k)} = {_fmt(best.get('param.' + k))}" for k in keys)

    parts = [_HEAD.format(title=_e(f"Sweep report: {exp.name}")),
             f"<h1>Sweep <code>{_e(exp.name)}</code></h1>",
             f'<p class="meta">{_e(str(exp))} · {len(rows)} trials ({_e(statuses)}) · ranked by '
             f"<code>{_e(state.metric)}</code> ({direction}) · written "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
             '<div class="best" id="best-trial">Best trial '
             f'<code class="trial-id" data-trial-id="{_e(best["trial_id"])}">{_e(best["trial_id"])}</code>: '
             f'{_e(column)} = <b class="value" data-value="{best[column]!r}">{best[column]:.6g}</b> '
             f'(best_epoch {best["best_epoch"]}, 0-based; {best["epochs"]} epochs trained; {_e(best["status"])})'
             f"{best_params}</div>",
             _nav(), _top_table(ranked, keys, column)]

    parts.append(_section("best-so-far", "Best so far",
                          f"The {'lowest' if state.mode == 'min' else 'highest'} {_e(state.metric)} any trial "
                          f"created so far has reached (its <code>{_e(column)}</code>), trials in the order Tune "
                          "created them; a trial without a value yet is left out.",
                          _img(_best_so_far_figure(rows, column, state.mode), "best-so-far")))
    parts.append(_section("parallel-coordinates", "Parallel coordinates",
                          "One line per scored trial, coloured by its best value (darker is better). Keys "
                          "sampled <code>loguniform</code> are on log axes.",
                          _img(_parallel_figure(ranked, keys, space, column), "parallel-coordinates")))
    parts.append(_section("importance", "Parameter importance", *_importance_html(ranked, keys, space, column,
                                                                                   state.mode)))
    parts.append(_section("learning-curves", "Learning curves",
                          f"{_e(state.metric)} per epoch of the {min(TOP_CURVES, len(ranked))} best trials; "
                          "✕ marks the last epoch of a trial ASHA stopped, ▲ a trial that diverged.",
                          _img(_curves_figure(exp, ranked[:TOP_CURVES], state.metric, state.mode),
                               "learning-curves")))
    parts.append(_section("distributions", f"Best trial {_e(best['trial_id'])}: real and generated jets",
                          *_distributions_html(state, best, seed, device)))
    parts.append("</body></html>\n")
    return "\n".join(parts)


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }}
h1 {{ margin-bottom: 0.2em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }}
.meta {{ color: #666; font-size: 0.9em; }}
.best {{ background: #eef6ee; border-left: 4px solid #3a3; padding: 0.6em 0.9em; margin: 0.8em 0; }}
nav a {{ margin-right: 1.2em; }}
table {{ border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: right; }}
th {{ background: #f4f4f4; }} td.id, th.id, td.text {{ text-align: left; font-family: monospace; }}
img.plot {{ max-width: 100%; height: auto; display: block; margin: 0.4em 0; }}
p.note {{ color: #555; font-size: 0.92em; max-width: 60em; }}
</style></head><body>"""


def _nav() -> str:
    names = {"best-so-far": "Best so far", "parallel-coordinates": "Parallel coordinates",
             "importance": "Importance", "learning-curves": "Learning curves", "distributions": "Best trial's jets"}
    return "<nav>" + "".join(f'<a href="#{s}">{names[s]}</a>' for s in SECTIONS) + "</nav>"


def _section(sid: str, title: str, note: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{title}</h2><p class="note">{note}</p>{body}</section>'


def _top_table(ranked: list[dict], keys: list[str], column: str, n: int = 10) -> str:
    heads = ["trial_id", "status", *keys, column, "best_epoch", "epochs"]
    out = ['<table id="top-trials"><tr>' + "".join(
        f'<th class="{"id" if h == "trial_id" else ""}">{_e(h)}</th>' for h in heads) + "</tr>"]
    for r in ranked[:n]:
        cells = [f'<td class="id">{_e(r["trial_id"])}</td>', f'<td class="text">{_e(r["status"])}</td>']
        cells += [f"<td>{_fmt(r.get(f'param.{k}'))}</td>" for k in keys]
        cells += [f'<td data-value="{r[column]!r}">{r[column]:.6g}</td>', f"<td>{_fmt(r['best_epoch'])}</td>",
                  f"<td>{_fmt(r['epochs'])}</td>"]
        out.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">{len(ranked) - n} more scored trials: <code>hvae-ray trials</code>.</p>' \
        if len(ranked) > n else ""
    return "".join(out) + "</table>" + more


def _img(fig, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" id="plot-{name}" alt="{name}" src="data:image/png;base64,{data}">'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


# ---------------------------------------------------------------------------------------------------------
# Plots of the table


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _best_so_far_figure(rows: list[dict], column: str, mode: str):
    fig = _figure(10, 3.6)
    ax = fig.add_subplot()
    xs, ys, ids = [], [], []
    for i, r in enumerate(rows, start=1):
        if _finite(r.get(column)):
            xs.append(i)
            ys.append(r[column])
            ids.append(r["trial_id"])
    pick = np.minimum.accumulate if mode == "min" else np.maximum.accumulate
    running = pick(np.asarray(ys, dtype=float))
    ax.scatter(xs, ys, s=22, color="tab:gray", alpha=0.7, label="trial's best", zorder=2)
    ax.step(xs, running, where="post", color="tab:blue", linewidth=2, label="best so far", zorder=3)
    ax.set_ylabel(column)
    ax.set_xlim(0.5, len(rows) + 0.5)
    prefixes = {r["trial_id"].rsplit("_", 1)[0] for r in rows}
    if len(rows) <= 30 and len(prefixes) == 1:  # Tune's ids: the experiment's prefix, then a counter
        ax.set_xticks(range(1, len(rows) + 1),
                      [r["trial_id"].rsplit("_", 1)[-1] for r in rows], rotation=45, fontsize=8)
        ax.set_xlabel(f"trial {prefixes.pop()}_…, in order of creation")
    else:
        ax.set_xlabel("trial, in order of creation")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig


def _axis_of(key: str, dist: dict[str, Any], values: list[Any]):
    """(position in [0, 1] of each value, tick positions, tick labels, log axis) of one searched key."""
    (kind, arg), = dist.items()
    if kind in ("choice", "grid"):
        choices = [str(c) for c in arg]
        for v in values:
            if str(v) not in choices:
                choices.append(str(v))
        pos = {c: (i / (len(choices) - 1) if len(choices) > 1 else 0.5) for i, c in enumerate(choices)}
        return [pos.get(str(v), math.nan) for v in values], list(pos.values()), choices, False
    lo, hi = float(arg[0]), float(arg[1])
    log = kind == "loguniform"
    f = (lambda x: math.log10(x)) if log else (lambda x: x)  # noqa: E731
    a, b = f(lo), f(hi)
    positions = [(f(float(v)) - a) / (b - a) if _finite(v) and (not log or v > 0) else math.nan for v in values]
    if log:
        ticks = [10.0 ** e for e in range(math.ceil(a - 1e-9), math.floor(b + 1e-9) + 1)]
        if len(ticks) < 2:
            ticks = [lo, hi]
    else:
        ticks = list(np.linspace(lo, hi, 5))
    return positions, [(f(t) - a) / (b - a) for t in ticks], [f"{t:.3g}" for t in ticks], log


def _parallel_figure(ranked: list[dict], keys: list[str], space: dict[str, Any], column: str):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    axes_pos, ticks, labels, names = [], [], [], []
    for k in keys:
        values = [r.get(f"param.{k}") for r in ranked]
        pos, tpos, tlab, log = _axis_of(k, space[k], values)
        axes_pos.append(pos)
        ticks.append(tpos)
        labels.append(tlab)
        names.append(f"{k}\n(log)" if log else k)
    metric = np.array([r[column] for r in ranked], dtype=float)
    lo, hi = float(metric.min()), float(metric.max())
    span = hi - lo if hi > lo else 1.0
    axes_pos.append(list((metric - lo) / span))
    mticks = list(np.linspace(lo, hi, 5)) if hi > lo else [lo]
    ticks.append([(t - lo) / span for t in mticks])
    labels.append([f"{t:.4g}" for t in mticks])
    names.append(column)

    n_axes = len(names)
    fig = _figure(max(6.0, 2.4 * n_axes), 4.6)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    # darker is better whatever the mode: the ranked order gives each trial its shade
    norm = Normalize(0, max(len(ranked) - 1, 1))
    xs = np.arange(n_axes)
    for i in reversed(range(len(ranked))):  # the best drawn last, on top
        ys = [axes_pos[j][i] for j in range(n_axes)]
        ax.plot(xs, ys, color=cmap(0.85 * norm(i)), linewidth=2.2 if i == 0 else 1.2,
                alpha=1.0 if i == 0 else 0.75, marker="o", markersize=3)
    for j in range(n_axes):
        ax.axvline(j, color="black", linewidth=0.8)
        for t, lab in zip(ticks[j], labels[j]):
            if -0.01 <= t <= 1.01:
                ax.plot([j - 0.03, j], [t, t], color="black", linewidth=0.8)
                ax.text(j - 0.05, t, lab, ha="right", va="center", fontsize=8)
    ax.set_xticks(xs, names)
    ax.set_xlim(-0.5, n_axes - 0.6)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"best trial: {ranked[0]['trial_id']} (thick line)", fontsize=9)
    return fig


def _curves_figure(exp: Path, top: list[dict], metric: str, mode: str):
    from matplotlib import colormaps

    from hvae_ray.sweep.layout import EPOCH, TrialPaths
    from hvae_ray.sweep.trials import epoch_results

    fig = _figure(10, 4.4)
    ax = fig.add_subplot()
    colors = colormaps["tab10"]
    for i, r in enumerate(top):
        results = epoch_results(TrialPaths(Path(r["trial_dir"])))
        pts = [(int(x[EPOCH]) + 1, float(x[metric])) for x in results  # epochs trained, ASHA's time axis
               if _finite(x.get(EPOCH)) and _finite(x.get(metric))]
        if not pts:
            continue
        ep, val = zip(*pts)
        ax.plot(ep, val, color=colors(i % 10), marker="o", markersize=3, linewidth=1.6 if i else 2.4,
                label=f"{r['trial_id']} ({r['status']})")
        if r["status"] in STOPPED:
            ax.plot(ep[-1], val[-1], marker="X", markersize=11, color=colors(i % 10), markeredgecolor="black",
                    linestyle="none", zorder=4)
        elif r["status"] == "diverged":
            ax.plot(ep[-1], val[-1], marker="^", markersize=10, color=colors(i % 10), markeredgecolor="black",
                    linestyle="none", zorder=4)
    ax.set_xlabel("epochs trained (the epoch column + 1)")
    ax.set_ylabel(metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper right" if mode == "min" else "lower right", ncols=2)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Parameter importance


def parameter_importance(ranked: list[dict], keys: list[str], space: dict[str, Any], column: str,
                         mode: str, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each searched key for ``column``: optuna's evaluator on a study of the
    scored rows (their best value as the trial's value), each key with the distribution it was sampled
    from. Keys optuna leaves out (one value only over the trials) are given 0. Needs 2 scored trials."""
    import logging

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if len(ranked) < 2:
        raise DataError("parameter importance needs at least 2 scored trials")
    distributions = {}
    for k in keys:
        (kind, arg), = space[k].items()
        if kind in ("choice", "grid"):
            distributions[k] = CategoricalDistribution([_choice(c) for c in arg])
        elif kind == "randint":
            distributions[k] = IntDistribution(int(arg[0]), int(arg[1]) - 1)
        else:
            distributions[k] = FloatDistribution(float(arg[0]), float(arg[1]), log=kind == "loguniform")
    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for r in ranked:
        params = {}
        for k in keys:
            v = r.get(f"param.{k}")
            if isinstance(distributions[k], CategoricalDistribution):
                v = next((c for c in distributions[k].choices if str(c) == str(v)), None)
            if v is None:
                break
            params[k] = v
        else:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                      value=float(r[column])))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=True)
    return {k: float(found.get(k, 0.0)) for k in keys}


def _choice(c: Any) -> Any:
    return c if c is None or isinstance(c, (bool, int, float, str)) else str(c)


def _importance_html(ranked: list[dict], keys: list[str], space: dict[str, Any], column: str,
                     mode: str) -> tuple[str, str]:
    note = (f"fANOVA (optuna's <code>FanovaImportanceEvaluator</code>, seed 0): the share of the variance "
            f"of {_e(column)} over the search space that each key explains, from random forests fitted to "
            f"the {len(ranked)} scored trials (an early-stopped trial counts with its best value before its stop). "
            "With few trials it is a rough guide.")
    try:
        imp = parameter_importance(ranked, keys, space, column, mode)
    except (DataError, ValueError, RuntimeError) as e:
        rows = "".join(f'<tr><td class="id">{_e(k)}</td><td>–</td></tr>' for k in keys)
        return note, (f'<p class="note"><b>Not computed:</b> {_e(e)}</p>'
                      f'<table id="importance-table"><tr><th class="id">key</th><th>importance</th></tr>{rows}</table>')
    order = sorted(keys, key=lambda k: -imp[k])
    fig = _figure(8, 0.5 + 0.45 * len(keys))
    ax = fig.add_subplot()
    ax.barh(range(len(order)), [imp[k] for k in order], color="tab:blue")
    ax.set_yticks(range(len(order)), order)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("importance (fANOVA, shares sum to 1)")
    for i, k in enumerate(order):
        ax.text(min(imp[k], 0.88) + 0.01, i, f"{imp[k]:.2f}", va="center", fontsize=8)
    rows = "".join(f'<tr><td class="id">{_e(k)}</td><td data-value="{imp[k]!r}">{imp[k]:.3f}</td></tr>'
                   for k in order)
    table = f'<table id="importance-table"><tr><th class="id">key</th><th>importance</th></tr>{rows}</table>'
    return note, _img(fig, "importance") + table


# ---------------------------------------------------------------------------------------------------------
# The best trial's jets


def best_trial_jets(state, best: dict, seed: int = 0, device: str = "cpu"):
    """(real, generated) jets of the best trial, each (particles (N, P, 3), mask (N, P)): its validation
    split of the sweep's data file (at most ``MAX_REAL_JETS``, a seeded subset) and as many jets decoded
    from N(0, 1) by its best checkpoint (at least ``MIN_GENERATED_JETS``), and the checkpoint used."""
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import generate, load_checkpoint, model_from_checkpoint, prepare
    from hvae_ray.sweep.layout import TrialPaths

    candidates = [best.get("best_checkpoint"), str(TrialPaths(Path(best["trial_dir"])).engine_best)]
    checkpoint, loaded, why = None, None, "no checkpoint kept"
    for c in candidates:
        if not c:
            continue
        try:
            loaded = load_checkpoint(c)
            checkpoint = c
            break
        except DataError as e:
            why = str(e)
    if loaded is None:
        raise DataError(why)
    model, normaliser, cfg = model_from_checkpoint(loaded, where=str(checkpoint))
    model.eval()
    splits = prepare(cfg, load_jets(state.data_path), normaliser)
    index = splits.val
    if len(index) > MAX_REAL_JETS:
        index = np.sort(np.random.default_rng(seed).choice(index, MAX_REAL_JETS, replace=False))
    real = splits.sample.subset(index)
    n_gen = max(len(index), MIN_GENERATED_JETS)
    gen = generate(model, normaliser, n_gen, seed=seed, device=device)
    return (real.particles, real.mask), gen, checkpoint


def _distributions_html(state, best: dict, seed: int, device: str) -> tuple[str, str]:
    try:
        (xr, mr), (xg, mg), checkpoint = best_trial_jets(state, best, seed, device)
    except (DataError, OSError) as e:
        return "Not drawn.", f'<p class="note"><b>No jets to compare:</b> {_e(e)}</p>'
    fig, w1 = distribution_ratio_figure(xr, mr, xg, mg)
    note = (f"{len(xr)} validation jets of the trial (real) against {len(xg)} jets decoded from N(0, 1) by "
            f"<code>{_e(checkpoint)}</code> (generated, seed {seed}), each histogram normalised to unit area; "
            "the lower panels show generated / real per bin with statistical errors (▲: above 2, ○: none generated). "
            "W1: the 1-Wasserstein distance between the two whole samples.")
    rows = "".join(f'<tr><td class="text">{_e(k)}</td><td data-value="{v!r}">{v:.4g}</td></tr>' for k, v in w1.items())
    return note, _img(fig, "distributions") + \
        f'<table id="w1-table"><tr><th class="id">distribution</th><th>W1</th></tr>{rows}</table>'


def distribution_ratio_figure(real_particles: np.ndarray, real_mask: np.ndarray, gen_particles: np.ndarray,
                              gen_mask: np.ndarray, num_bins: int = 40):
    """Particle η_rel, φ_rel, pT_rel and relative jet mass, real against generated on shared bins
    (``evaluation.plots``' bins, labels and styles), each over a generated/real ratio panel with
    statistical errors and the W1 (``evaluation.metrics.wasserstein_1d``) of the two samples in its
    title. Returns (figure, {panel title: W1})."""
    from hvae_ray.data.jets import PARTICLE_FEATURES
    from hvae_ray.evaluation.efp import as_particles, jet_mass
    from hvae_ray.evaluation.metrics import wasserstein_1d
    from hvae_ray.evaluation.plots import _GEN_STYLE, _PARTICLE_LABELS, _REAL_STYLE, _shared_bins

    xr, mr = as_particles(real_particles, real_mask)
    xg, mg = as_particles(gen_particles, gen_mask)
    panels = []
    for key in PARTICLE_FEATURES:
        f = PARTICLE_FEATURES.index(key)
        xlabel, logy, title = _PARTICLE_LABELS[key]
        panels.append((title, xlabel, logy, xr[..., f][mr], xg[..., f][mg]))
    panels.append(("Jet mass", r"Relative jet mass $m/p_T^{\mathrm{jet}}$", False, jet_mass(xr, mr),
                   jet_mass(xg, mg)))

    fig = _figure(11, 8.6)
    subfigs = fig.subfigures(2, 2)
    w1: dict[str, float] = {}
    for sub, (title, xlabel, logy, a, b) in zip(subfigs.flat, panels):
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        w = wasserstein_1d(a, b) if len(a) and len(b) else math.nan
        w1[title] = w
        top, bottom = sub.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        bins = _shared_bins(a, b, num_bins)
        ra, _ = np.histogram(a, bins=bins)
        gb, _ = np.histogram(b, bins=bins)
        top.hist(a, bins=bins, density=True, **_REAL_STYLE)
        top.hist(b, bins=bins, density=True, **_GEN_STYLE)
        if logy:
            top.set_yscale("log")
        top.set_ylabel("normalised")
        top.set_title(f"{title}: W1 = {w:.3g}", fontsize=10)
        top.legend(frameon=False, fontsize=8)
        centres = 0.5 * (bins[1:] + bins[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (gb / max(gb.sum(), 1)) / (ra / max(ra.sum(), 1))
            err = ratio * np.sqrt(1.0 / gb + 1.0 / ra)
        ok = (ra > 0) & (gb > 0)
        inside = ok & (ratio <= 2)
        bottom.errorbar(centres[inside], ratio[inside], yerr=err[inside], fmt="o", markersize=2.5, color="tab:red",
                        elinewidth=0.8)
        above = ok & (ratio > 2)  # off the panel (generated where real is rare): a mark at its top
        bottom.plot(centres[above], np.full(above.sum(), 1.9), "^", markersize=4, color="tab:red")
        none = (ra > 0) & (gb == 0)  # no generated jet in the bin
        bottom.plot(centres[none], np.zeros(none.sum()), "o", markersize=3, markerfacecolor="none", color="tab:red",
                    clip_on=False)
        bottom.axhline(1.0, color="black", linewidth=0.8)
        bottom.set_ylim(0, 2)
        bottom.set_ylabel("gen / real")
        bottom.set_xlabel(xlabel)
        bottom.grid(alpha=0.3)
    return fig, w1
