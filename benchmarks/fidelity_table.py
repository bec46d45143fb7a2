"""The fidelity table of a results folder: per flavour, the floor (two disjoint real sets of the same N), each
seed's metrics with their ratio to the floor, the median seed and the worst, against the targets.

Reads RESULTS/F/seedS/evaluate.json (``hvae-ray evaluate --json``, written by fidelity_evaluate.sh); prints a
Markdown table and writes RESULTS/fidelity.json (the same numbers).

  python benchmarks/fidelity_table.py RESULTS
"""

import json
import statistics
import sys
from pathlib import Path

#: metric → (the table's name, the target ratio to its floor for the median seed, for the worst seed)
TARGETS = {"w1m": ("W1m", 1.5, 2.0), "w1p_mean": ("W1p", 1.5, 2.0), "w1efp_mean": ("W1efp", 1.5, 2.0),
           "fpd": ("FPD", 3.0, 5.0), "kpd": ("KPD", 10.0, None)}


def ratio(run: dict, key: str) -> float | None:
    """The metric over its floor; None where the floor is not positive (KPD's is ≈ 0 and may be negative)."""
    floor = run[f"{key}_floor"]
    return run[key] / floor if floor > 0 else None


def flavour_rows(runs: dict[int, dict]) -> tuple[list[dict], dict]:
    """One row per seed, the median seed and the worst (per metric), and each metric's verdict."""
    rows = [{"seed": s, **{k: (r[k], ratio(r, k)) for k in TARGETS}} for s, r in sorted(runs.items())]
    summary: dict = {}
    for key, (_, median_target, worst_target) in TARGETS.items():
        values = [r[key] for r in runs.values()]
        ratios = [x for x in (ratio(r, key) for r in runs.values()) if x is not None]
        summary[key] = {"median": statistics.median(values), "worst": max(values),
                        "median_ratio": statistics.median(ratios) if ratios else None,
                        "worst_ratio": max(ratios) if ratios else None}
        if ratios:
            summary[key]["meets_median_target"] = statistics.median(ratios) <= median_target
            if worst_target is not None:
                summary[key]["meets_worst_target"] = max(ratios) <= worst_target
    return rows, summary


def cell(value: float, r: float | None) -> str:
    return f"{value:.2e}" + (f" ({r:.1f}×)" if r is not None else "")


def main() -> None:
    results = Path(sys.argv[1])
    report, lines = {}, ["| flavour | seed | " + " | ".join(n for n, _, _ in TARGETS.values()) + " |",
                         "|---|---|" + "---|" * len(TARGETS)]
    for flavour in ("q", "g", "t", "w", "z"):
        runs = {int(p.parent.name.removeprefix("seed")): json.loads(p.read_text())
                for p in sorted(results.glob(f"{flavour}/seed*/evaluate.json"))}
        if not runs:
            continue
        rows, summary = flavour_rows(runs)
        any_run = next(iter(runs.values()))
        n = any_run["n_per_side"]
        lines.append(f"| {flavour} | floor (N = {n:,}) | "
                     + " | ".join(f"{any_run[k + '_floor']:.2e}" for k in TARGETS) + " |")
        lines += [f"| {flavour} | {r['seed']} | " + " | ".join(cell(*r[k]) for k in TARGETS) + " |" for r in rows]
        lines.append(f"| {flavour} | **median** | " + " | ".join(
            cell(summary[k]["median"], summary[k]["median_ratio"]) for k in TARGETS) + " |")
        lines.append(f"| {flavour} | worst | " + " | ".join(
            cell(summary[k]["worst"], summary[k]["worst_ratio"]) for k in TARGETS) + " |")
        report[flavour] = {"n_per_side": n, "seeds": {s: {k: runs[s][k] for k in TARGETS} for s in runs},
                           "floor": {k: any_run[f"{k}_floor"] for k in TARGETS}, "summary": summary}
    print("\n".join(lines))
    (results / "fidelity.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
