"""Evaluation of generated jets, after JetNet's layout: jet observables and EFPs (:mod:`.efp`), the
field's metrics exactly as jetnet 0.2.5 computes them (:mod:`.metrics`) and real-vs-generated figures
(:mod:`.plots`). Import the submodules; this package imports none of them (plots needs matplotlib)."""
