"""``dnfer bench``: resumable sweeps of methods x label noise x seeds under one shared budget.

- :mod:`dnfer.bench.spec`: the sweep file and the resolved per-cell configs.
- :mod:`dnfer.bench.runner`: runs cells (one ``dnfer train`` process each), skip/resume/retry.
- :mod:`dnfer.bench.report`: results.csv, results.md and the accuracy-vs-noise plot, as pure
  functions of the results rows.
"""

from dnfer.bench.report import markdown_report, metric_table, plot_accuracy_vs_noise, write_reports  # noqa: F401
from dnfer.bench.runner import CellOutcome, run_sweep  # noqa: F401
from dnfer.bench.spec import Cell, NoiseSetting, SweepSpec, build_cells, load_sweep  # noqa: F401
