"""Trial tables: an experiment directory → one ``pyarrow.Table`` row per trial; sort, export, best config.

Columns: trial_id, status, one ``param.<key>`` column per searched config key; for each tracked metric
m: ``best_<m>`` (its best value over the epochs, on its own), ``last_<m>`` (the last epoch's) and
``<m>_at_best`` (at the trial's best epoch by the sweep's metric, e.g. the KL of the model it kept);
val_kl_slope_last20 (the least-squares slope of val_kl over the last 20 epochs, nats per epoch: near 0
once the KL levels off);
best_epoch (0-based, the TensorBoard step of that epoch), epochs (a count), wall_time_s, population (the
slots of the population the trial trained in; 1: a process of its own),
best_checkpoint, error, node_id, trial_dir. status is one of: completed (ran to max_t),
early_stopped (stopped by ASHA), diverged (NaN loss or KL runaway), error, running, unfinished,
pending. Every column name is what ``sort_trials`` and the table's header take. The files read are those of
:mod:`hvae_ray.sweep.layout`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from hvae_ray.errors import ConfigError, DataError
from hvae_ray.sweep.layout import (
    CHECKPOINT_PATH,
    EPOCH,
    EPOCHS_DONE,
    ERROR,
    NODE_ID,
    TIME_TOTAL,
    SweepState,
    TrialPaths,
    is_diverged,
    read_jsonl,
    read_sweep_state,
    trial_paths,
)
from hvae_ray.tracking import KL_SLOPE_EPOCHS, kl_slope
from hvae_ray.tracking import TRIAL_METRICS as METRICS

KL_SLOPE_COLUMN = f"val_kl_slope_last{KL_SLOPE_EPOCHS}"


def epoch_results(paths: TrialPaths) -> list[dict[str, Any]]:
    """Per-epoch results of a trial, oldest first.

    Tune's ``result.json`` starts afresh when an unfinished trial is resumed; the epochs before it come
    from the trial's own epoch log (``engine/metrics.jsonl``, written by rank 0, kept across resumes).
    """
    tune_rows = read_jsonl(paths.results)
    log_rows = read_jsonl(paths.metrics_log)
    first = next((r[EPOCH] for r in tune_rows if isinstance(r.get(EPOCH), (int, float))), None)
    if first is None:
        return tune_rows or log_rows
    # Epochs before Tune's first row were lost from result.json by a resume; an epoch trained twice
    # (after a killed driver) keeps its last record. Epochs after Tune's last row (trained while Tune
    # was stopping the trial) are not counted, as Tune did not see them.
    earlier: dict[Any, dict[str, Any]] = {}
    for r in log_rows:
        if isinstance(r.get(EPOCH), (int, float)) and r[EPOCH] < first:
            earlier[r[EPOCH]] = r
    return [earlier[e] for e in sorted(earlier)] + tune_rows


def _tune_statuses(exp: Path) -> dict[str, str]:
    """trial_id → Tune status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) from the experiment state,
    read only when it carries this user's signature (Ray unpickles parts of it; ``sweep.signing``).

    Without a state (a driver killed before Tune's first save) or with one cut short (caught while Tune
    rewrote it), or not signed, statuses come from the results alone ({}); a state that cannot be read
    for another reason is said in one line on stderr, and statuses then come from the results too."""
    from hvae_ray.errors import HvaeError
    from hvae_ray.sweep.signing import verify

    try:
        verify(exp)
    except HvaeError:
        return {}  # not shown to be the user's own: statuses come from the results alone
    if not any(exp.glob("experiment_state-*.json")):
        return {}
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(exp))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # removed or half-written while Tune replaced it
    except Exception as e:  # noqa: BLE001 - any other failure is Ray's: said, and the table still shown
        why = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"{exp}: Ray Tune's experiment state cannot be read ({type(e).__name__}: {why}); trial "
              "statuses come from their results alone", file=sys.stderr)
        return {}
    return {t.trial_id: t.status for t in analysis.trials}


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def load_trials(experiment_dir: str | Path) -> pa.Table:
    """The trial table of an experiment directory (see the module docstring for the columns)."""
    exp = Path(experiment_dir).resolve()
    state = read_sweep_state(exp)
    statuses = _tune_statuses(exp)
    rows = [_trial_row(paths, state, statuses.get(paths.trial_id, "")) for paths in trial_paths(exp)]
    keys = state.searched_keys
    return pa.Table.from_pylist(rows, schema=_schema(keys, rows)).select(_column_order(keys))


def _trial_row(paths: TrialPaths, state: SweepState, tune_status: str) -> dict[str, Any]:
    """One trial's row: its parameters, metric columns, best epoch and checkpoint, status and error."""
    params = json.loads(paths.params.read_text()) if paths.params.is_file() else {}
    results = epoch_results(paths)
    last = results[-1] if results else {}
    row: dict[str, Any] = {"trial_id": paths.trial_id}
    row.update({f"param.{k}": params.get(k) for k in state.searched_keys})
    best_row = _best_row(results, state.metric, state.mode)
    row.update(_metric_columns(results, best_row, state.metric, state.mode))
    row[KL_SLOPE_COLUMN] = kl_slope([(float(r[EPOCH]), kl) for r in results if isinstance(r.get(EPOCH), (int, float))
                                     and (kl := _finite(r.get("val_kl"))) is not None])
    row["best_epoch"] = int(best_row[EPOCH]) if EPOCH in best_row else None
    row["epochs"] = int(max((r.get(EPOCHS_DONE, 0) for r in results), default=0))
    row["wall_time_s"] = _finite(last.get(TIME_TOTAL))
    # the slots of the population it trained in (1: a process of its own)
    row["population"] = int(max((r.get("population", 1) for r in results), default=1)) if results else None
    row["best_checkpoint"] = _best_checkpoint(paths, best_row, state.metric)
    row["node_id"] = last.get(NODE_ID)
    row["error"] = _error_of(paths, results)
    row["status"] = _status(tune_status, results, row["error"], row["epochs"], state.max_t)
    row["trial_dir"] = str(paths.root)
    return row


def _best_row(results: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """The epoch that is best by the sweep's metric ({} when none has reported it)."""
    scored = [r for r in results if _finite(r.get(metric)) is not None]
    return (min if mode == "min" else max)(scored, key=lambda r: r[metric]) if scored else {}


def _metric_columns(results: list[dict[str, Any]], best_row: dict[str, Any], metric: str,
                    mode: str) -> dict[str, float | None]:
    """last_<m>, best_<m> (each metric's own best over the epochs) and <m>_at_best for every metric."""
    last = results[-1] if results else {}
    out: dict[str, float | None] = {}
    for m in METRICS:
        vals = [v for r in results if (v := _finite(r.get(m))) is not None]
        out[f"last_{m}"] = _finite(last.get(m))
        out[f"best_{m}"] = (min(vals) if mode == "min" or m != metric else max(vals)) if vals else None
        out[f"{m}_at_best"] = _finite(best_row.get(m))
    return out


def _best_checkpoint(paths: TrialPaths, best_row: dict[str, Any], metric: str) -> str | None:
    best = best_row.get(CHECKPOINT_PATH)
    if (best is None or not Path(best).exists()) and paths.engine_best.is_dir():
        # the engine's own best/ is kept by its objective's metric, which is the sweep's metric (sweep.spec
        # refuses a sweep whose two differ)
        best = str(paths.engine_best)
    return best


def _error_of(paths: TrialPaths, results: list[dict[str, Any]]) -> str | None:
    """Why a trial diverged (its terminal report), else the last line of Tune's error file."""
    if any(is_diverged(r) for r in results):
        return next((r.get(ERROR) for r in results if r.get(ERROR)), "diverged")
    if paths.error.is_file():
        text = [ln for ln in paths.error.read_text().splitlines() if ln.strip()]
        return text[-1][:300] if text else "error"
    return None


def _status(tune_status: str, results: list[dict[str, Any]], error: str | None, epochs: int, max_t: int) -> str:
    if any(is_diverged(r) for r in results):
        return "diverged"
    if tune_status == "ERROR" or (error and tune_status != "TERMINATED"):
        return "error"
    if tune_status in ("RUNNING", "PAUSED") or (tune_status in ("", "PENDING") and results and epochs < max_t):
        # PENDING with results: Tune sets a trial that was training when the run was interrupted
        # back to PENDING, for resume
        return "running" if tune_status == "RUNNING" else "unfinished"
    if tune_status == "PENDING" or not results:
        return "pending"
    return "completed" if epochs >= max_t else "early_stopped"


def _column_order(keys: list[str]) -> list[str]:
    cols = ["trial_id", "status", *(f"param.{k}" for k in keys)]
    for m in METRICS:
        cols += [f"best_{m}", f"last_{m}", f"{m}_at_best"]
    return cols + [KL_SLOPE_COLUMN, "best_epoch", "epochs", "wall_time_s", "population", "best_checkpoint", "error",
                   "node_id", "trial_dir"]


def _schema(keys: list[str], rows: list[dict[str, Any]]) -> pa.Schema:
    fields = [pa.field("trial_id", pa.string()), pa.field("status", pa.string())]
    for k in keys:
        values = [r[f"param.{k}"] for r in rows if r.get(f"param.{k}") is not None]
        if values and all(isinstance(v, bool) for v in values):
            typ = pa.bool_()
        elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            typ = pa.int64()
        elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            typ = pa.float64()
        else:
            typ = pa.string()
            for r in rows:
                if r.get(f"param.{k}") is not None:
                    r[f"param.{k}"] = str(r[f"param.{k}"])
        fields.append(pa.field(f"param.{k}", typ))
    for m in METRICS:
        fields += [pa.field(f"best_{m}", pa.float64()), pa.field(f"last_{m}", pa.float64()),
                   pa.field(f"{m}_at_best", pa.float64())]
    fields += [pa.field(KL_SLOPE_COLUMN, pa.float64()), pa.field("best_epoch", pa.int64()),
               pa.field("epochs", pa.int64()), pa.field("wall_time_s", pa.float64()),
               pa.field("population", pa.int64()), pa.field("best_checkpoint", pa.string()),
               pa.field("error", pa.string()), pa.field("node_id", pa.string()),
               pa.field("trial_dir", pa.string())]
    return pa.schema(fields, metadata={"format": "hvae-ray trials v1"})


def _sort_column(table: pa.Table, experiment_dir: str | Path, metric: str | None) -> tuple[str, str, str]:
    """(column, the sweep metric it belongs to or "", mode) for a sort key: any numeric column name the
    table shows (``best_val_w1m``, ``last_val_kl``, ``val_kl_at_best``, ``epochs``, ``param.<key>``, or a
    searched key without ``param.``), or a bare metric name, meaning its best value."""
    state = read_sweep_state(Path(experiment_dir).resolve())
    sweep_metric, sweep_mode = state.metric, state.mode
    chosen = metric or sweep_metric
    names = set(table.column_names)
    if chosen in METRICS:
        column = f"best_{chosen}"
    elif chosen in names:
        column = chosen
    elif f"param.{chosen}" in names:
        column = f"param.{chosen}"
    else:
        column = None
    def numeric(name: str) -> bool:
        typ = table.schema.field(name).type
        return pa.types.is_integer(typ) or pa.types.is_floating(typ)

    if column is None or not numeric(column):
        shown = sorted(n for n in names if numeric(n))
        raise ConfigError(f"sort: unknown metric or column '{chosen}' (a metric: {', '.join(METRICS)}; "
                          f"or a column: {', '.join(shown)})")
    base = next((m for m in METRICS if column in (f"best_{m}", f"last_{m}", f"{m}_at_best")), "")
    mode = sweep_mode if base == sweep_metric else "min"
    return column, base, mode


def sweep_metric(experiment_dir: str | Path) -> str:
    """The metric the sweep ranks its trials by (its scheduler's)."""
    return read_sweep_state(Path(experiment_dir).resolve()).metric


def sort_trials(table: pa.Table, experiment_dir: str | Path, metric: str | None = None) -> pa.Table:
    """Rows ordered by ``metric`` (default: the sweep's metric): a metric name sorts by its best value,
    a column name (as the table shows it) by that column; trials without a value last."""
    column, _, mode = _sort_column(table, experiment_dir, metric)
    return table.sort_by([(column, "ascending" if mode == "min" else "descending")])


def best_config_yaml(table: pa.Table, experiment_dir: str | Path, metric: str | None = None) -> str:
    """The best trial's full training config as YAML, a config file for ``train``."""
    import yaml


    ranked = sort_trials(table, experiment_dir, metric)
    column, _, _ = _sort_column(table, experiment_dir, metric)
    if ranked.num_rows == 0 or ranked.column(column)[0].as_py() is None:
        raise DataError(f"{experiment_dir}: no trial has reported {column} yet")
    best = ranked.slice(0, 1).to_pylist()[0]
    state = read_sweep_state(Path(experiment_dir).resolve())
    spec = state.spec
    params = json.loads(TrialPaths(Path(best["trial_dir"])).params.read_text())
    cfg = spec.trial_config(params).with_overrides({"data.path": str(state.data_path)})
    header = (f"# best trial {best['trial_id']} of {Path(experiment_dir).name}: "
              f"{column} = {best[column]:.6g} after {best['epochs']} epochs\n"
              f"# data.path: the jets the sweep trained on; `train --config` reads them unless --data-path is given\n")
    return header + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def export(table: pa.Table, path: str | Path, overwrite: bool = False) -> Path:
    """Write the table to .parquet or .csv (never over an existing file unless ``overwrite``)."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise ConfigError(f"{path}: export must end in .parquet or .csv")
    if path.exists() and not overwrite:
        raise DataError(f"{path}: already exists; not overwriting it")
    from hvae_ray.io_safe import atomic_write, write_failed

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        def write(f) -> None:
            pq.write_table(table, f)
    else:
        import pyarrow.csv as pacsv

        def write(f) -> None:
            pacsv.write_csv(table, f)
    try:
        return atomic_write(path, write)
    except OSError as e:
        raise write_failed(path, e) from None


#: The columns ``format_table`` shows by default, around the searched parameters.
DEFAULT_COLUMNS = ("trial_id", "status", "<params>", "best_<metric>", "best_val_w1m", "val_kl_at_best",
                   "last_val_kl", "best_epoch", "epochs", "wall_time_s", "error")


def table_columns(table: pa.Table, metric: str, columns: list[str] | None = None) -> list[str]:
    """The columns to print: ``columns`` as given (checked against the table), else the defaults with
    the searched parameters and the sweep's metric filled in."""
    if columns:
        unknown = [c for c in columns if c not in table.column_names and f"param.{c}" not in table.column_names]
        if unknown:
            raise ConfigError(f"columns: unknown column '{unknown[0]}' (one of {', '.join(table.column_names)})")
        return [c if c in table.column_names else f"param.{c}" for c in columns]
    params = [c for c in table.column_names if c.startswith("param.")]
    out: list[str] = []
    for c in DEFAULT_COLUMNS:
        out += params if c == "<params>" else [f"best_{metric}" if c == "best_<metric>" else c]
    return list(dict.fromkeys(out))  # best_<metric> may be one of the fixed columns too


def format_table(table: pa.Table, columns: list[str] | None = None, metric: str = "val_objective",
                 max_width: int = 14) -> str:
    """A plain-text table for the terminal. Headers are the columns' whole names (``param.`` left off
    the searched keys), so every header is a name ``sort_trials`` takes; values are cut to ``max_width``
    (60 for ``error``)."""
    cols = table_columns(table, metric, columns)
    heads = [c.removeprefix("param.") for c in cols]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    rows = [[fmt(r[c]) for c in cols] for r in table.to_pylist()]
    widths = [max([len(h)] + [min(len(r[i]), 60 if c == "error" else max_width) for r in rows])
              for i, (h, c) in enumerate(zip(heads, cols))]
    line = lambda vals: "  ".join(v[:w].ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(r) for r in rows)])
