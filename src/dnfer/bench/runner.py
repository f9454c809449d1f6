"""Run a sweep's cells, resumably, each as an ordinary ``dnfer train`` run directory.

A cell is *finished* when its ``summary.json`` exists: a later sweep skips it. An interrupted
cell (``last.pt`` but no summary) continues with ``--resume``. A cell that fails is retried up
to ``retries`` times and then reported; the other cells still run. By default every cell runs in
its own ``python -m dnfer train`` process so that even a segfault or an out-of-memory kill of
one cell cannot end the sweep; ``runner="inprocess"`` trades that isolation for no interpreter
start-up (tests, tiny sweeps). ``jobs`` > 1 trains that many cells at once (subprocess runner
only), e.g. one per core on a CPU with one torch thread each: small models use two threads
poorly, so two one-thread cells finish sooner than two two-thread cells in a row.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dnfer.bench.report import RESULT_FIELDS, confusion_levels, degenerate_reason, write_reports
from dnfer.bench.spec import Cell, SweepSpec, build_cells
from dnfer.config import Config, comparable_config
from dnfer.errors import ConfigError, DnferError
from dnfer.io_safety import write_text_atomic

#: The file each cell's config is written to (the input of its ``dnfer train --config``).
CELL_CONFIG = "cell.yaml"
CELL_LOG = "train.log"

Runner = Callable[[Cell, bool, Path], int]


@dataclass
class CellOutcome:
    """What happened to one cell in this invocation.

    Attributes:
        action: ``skipped`` (already finished), ``ran``, ``resumed`` or ``failed``.
        attempts: training attempts made now (0 when skipped).
        error: last lines of the cell's log when it failed.
    """

    cell: Cell
    action: str
    attempts: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.action != "failed"


def run_subprocess(cell: Cell, resume: bool, log_path: Path, *, threads: int | None = None) -> int:
    """Train one cell in a fresh interpreter; stdout/stderr appended to the cell's log.

    ``threads``: default torch/OpenMP thread count of the child (``OMP_NUM_THREADS``) when the
    cell's config leaves ``train.threads`` unset; concurrent cells must not each take every core.
    """
    cmd = [sys.executable, "-m", "dnfer", "train", "--config", str(cell.run_dir / CELL_CONFIG),
           "--out", str(cell.run_dir), "--no-progress"]
    if resume:
        cmd.append("--resume")
    env = None
    if threads is not None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False, env=env)
    return proc.returncode


def run_inprocess(cell: Cell, resume: bool, log_path: Path) -> int:
    """Train one cell in this process (no crash isolation); exceptions become exit code 1."""
    from dnfer.engine.trainer import fit

    cfg = Config.from_dict(cell.config.to_dict(), source=str(cell.run_dir / CELL_CONFIG))
    with open(log_path, "a") as log:
        def say(msg: str) -> None:
            log.write(msg + "\n")
            log.flush()

        try:
            fit(cfg, log=say, resume=resume)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a failed cell is recorded, never fatal to the sweep
            log.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            return 1
    return 0


RUNNERS: dict[str, Runner] = {"subprocess": run_subprocess, "inprocess": run_inprocess}


def check_cell_configs(cells: list[Cell]) -> None:
    """Refuse to mix results: a cell directory made with other settings is an error.

    Compares the stored ``cell.yaml`` of every finished or resumable cell with the cell's config
    now. A cell that failed before its first checkpoint holds no results and is simply rerun
    with the new settings (so fixing a bad override and sweeping again just works).
    """
    for cell in cells:
        path = cell.run_dir / CELL_CONFIG
        has_results = (cell.run_dir / "summary.json").is_file() or (cell.run_dir / "last.pt").is_file()
        if not (path.is_file() and has_results):
            continue
        try:
            old = comparable_config(yaml.safe_load(path.read_text()), source=str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ConfigError(f"{path}: unreadable cell config ({e}); delete that cell directory to rerun it") from None
        new = comparable_config(cell.config.to_dict())
        diff = _first_difference(old, new)
        if diff is not None:
            key, a, b = diff
            raise ConfigError(
                f"cell {cell.key} in {cell.run_dir} was run with {key}={a!r}, the sweep now asks {b!r}; "
                "use a new --out directory (or delete that cell) so results are not mixed"
            )


def _first_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        if name in ("train.progress", "out"):  # a moved sweep directory is the same sweep
            continue
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict) and name not in ("data.options", "method.params"):
            d = _first_difference(x, y, name + ".")
            if d is not None:
                return d
        elif x != y:
            return name, x, y
    return None


def run_cell(cell: Cell, runner: Runner, retries: int, say: Callable[[str], None]) -> CellOutcome:
    """Train one cell unless finished; retry failures; never raises for a failed cell."""
    run_dir = cell.run_dir
    if (run_dir / "summary.json").is_file():
        return CellOutcome(cell, "skipped")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CELL_CONFIG, cell.config.to_yaml())
    log_path = run_dir / CELL_LOG
    t0 = time.perf_counter()
    resumed = False
    for attempt in range(1, retries + 2):
        resume = (run_dir / "last.pt").is_file()
        resumed = resumed or resume
        if not resume:  # a fresh start must not append to epochs logged by a crashed attempt
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        rc = runner(cell, resume, log_path)
        if (run_dir / "summary.json").is_file():
            return CellOutcome(cell, "resumed" if resumed else "ran", attempt, time.perf_counter() - t0)
        say(f"  {cell.key}: attempt {attempt} failed (exit code {rc}); log: {log_path}")
    tail = _tail(log_path, 6)
    return CellOutcome(cell, "failed", retries + 1, time.perf_counter() - t0, tail)


def _tail(path: Path, n: int) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def pending_row(cell: Cell) -> dict[str, Any]:
    """A results.csv row that names the cell and nothing else (status ``pending``)."""
    row: dict[str, Any] = {k: None for k in RESULT_FIELDS}
    row.update(method=cell.method, noise=cell.noise.label, noise_kind=cell.noise.kind, noise_rate=cell.noise.rate,
               seed=cell.seed, run_dir=str(cell.run_dir), status="pending")
    return row


def result_row(cell: Cell, outcome: CellOutcome | None) -> dict[str, Any]:
    """One results.csv row from a cell's summary.json (or its failure)."""
    row = pending_row(cell)
    summary_path = cell.run_dir / "summary.json"
    if summary_path.is_file():
        try:
            s = json.loads(summary_path.read_text())
        except ValueError as e:
            raise DnferError(f"{summary_path}: not a valid summary ({e}); delete it to rerun the cell") from e
        row["status"] = "ok"
        for k in ("final_test_acc", "best_val_test_acc", "best_val_epoch", "selection_precision",
                  "selection_recall", "noise_realised_rate", "train_seconds", "epochs",
                  "best_test_acc_test_selected"):
            row[k] = s.get(k)
        confusion = _test_confusion(cell.run_dir, row["best_val_epoch"])
        if confusion is not None:
            row["chance_rate"], row["majority_rate"], row["top_prediction_share"] = confusion_levels(confusion)
            acc = row["best_val_test_acc"] if row["best_val_test_acc"] is not None else row["final_test_acc"]
            row["degenerate"] = degenerate_reason(acc, row["chance_rate"], row["majority_rate"],
                                                  row["top_prediction_share"]) or None
    elif outcome is not None and outcome.action == "failed":
        row["status"] = "failed"
    return row


def _test_confusion(run_dir: Path, epoch: int | None) -> list[list[float]] | None:
    """The test confusion matrix recorded at ``epoch`` (the last recorded one if None or absent) in
    ``metrics.jsonl``; None when there is none (the degeneracy check is then skipped, not failed)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    by_epoch: dict[int, Any] = {}
    for line in lines:
        try:
            rec = json.loads(line)
            by_epoch[int(rec["epoch"])] = rec.get("test_confusion")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed run: the other epochs still count
    cm = by_epoch.get(epoch) if epoch in by_epoch else (by_epoch[max(by_epoch)] if by_epoch else None)
    if not cm or not isinstance(cm, list) or sum(sum(r) for r in cm) <= 0:
        return None
    return cm


def run_sweep(spec: SweepSpec, out: str | Path, *, runner: str | Runner = "subprocess", retries: int = 1,
              best_on_test: bool = False, report_only: bool = False, jobs: int = 1,
              say: Callable[[str], None] = print,
              progress: bool = False) -> tuple[list[dict[str, Any]], list[CellOutcome]]:
    """Run (or skip) every cell, then write ``results.csv``, ``results.md`` and the plot in ``out``.

    ``progress``: a bar of cells done / total on stderr (a terminal only).

    ``jobs``: cells trained at the same time (each still its own process with the subprocess
    runner; cells whose config leaves ``train.threads`` unset get ``cores // jobs`` threads).
    Returns the results rows and this invocation's outcomes (empty when ``report_only``).
    """
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {retries}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and runner == "inprocess":
        raise ConfigError("--jobs > 1 needs --runner subprocess (cells in one process would share its threads)")
    run_fn = RUNNERS[runner] if isinstance(runner, str) else runner
    if jobs > 1 and run_fn is run_subprocess:
        run_fn = functools.partial(run_subprocess, threads=max(1, (os.cpu_count() or 1) // jobs))
    out = Path(out)
    cells = build_cells(spec, out)
    check_cell_configs(cells)
    out.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, CellOutcome] = {}
    notes = sorted({n for c in cells for n in c.notes})

    def write(*, partial: bool = False) -> list[dict[str, Any]]:
        # While the sweep runs, a cell without an outcome may be training right now (with --jobs):
        # report it as pending rather than read files its process is still writing.
        rows = [result_row(c, outcomes.get(c.key)) if not partial or c.key in outcomes else pending_row(c)
                for c in cells]
        write_reports(rows, out, spec=spec, notes=notes, best_on_test=best_on_test)
        return rows

    if not report_only:
        # A named backbone (--pretrained dnfer:NAME) is built once here, before any cell, rather
        # than by the first cells at the same time.
        for source in sorted({c.config.model.pretrained for c in cells
                              if (c.config.model.pretrained or "").startswith("dnfer:")}):
            from dnfer.engine.backbones import named_backbone

            model_names = {c.config.model.name for c in cells if c.config.model.pretrained == source}
            named_backbone(source.split(":", 1)[1], model_name=model_names.pop() if len(model_names) == 1 else None,
                           log=say, progress=progress)
        t_start = time.perf_counter()
        done = 0
        from dnfer.progress import progress_bar

        bar = progress_bar(len(cells), "bench: cells", enabled=progress, unit="cell")

        def record(outcome: CellOutcome) -> None:
            nonlocal done
            done += 1
            outcomes[outcome.cell.key] = outcome
            what = {"skipped": "skipped (finished)", "failed": f"FAILED after {outcome.attempts} attempt(s)"}.get(
                outcome.action, f"{outcome.action} in {outcome.seconds:.1f} s")
            say(f"[{done}/{len(cells)}] {outcome.cell.key}: {what}")
            if outcome.action == "failed" and outcome.error:
                say("    " + outcome.error.replace("\n", "\n    "))
            write(partial=True)  # partial results stay visible while the sweep runs
            bar.update(1)

        # Seed by seed, setting by setting: an interrupted sweep still holds complete method
        # comparisons (every method at the same noise draw) rather than a few methods everywhere.
        seed_rank = {seed: i for i, seed in enumerate(spec.seeds)}
        noise_rank = {n.label: i for i, n in enumerate(spec.noise)}
        method_rank = {m: i for i, m in enumerate(spec.methods)}
        order = sorted(cells, key=lambda c: (seed_rank[c.seed], noise_rank[c.noise.label], method_rank[c.method]))
        if jobs == 1:
            for cell in order:
                record(run_cell(cell, run_fn, retries, say))
        else:
            # Threads only wait on child processes; reports are written from this thread alone.
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(run_cell, cell, run_fn, retries, say) for cell in order]
                for future in as_completed(futures):
                    record(future.result())
        bar.close()
        say(f"sweep wall time {time.perf_counter() - t_start:.1f} s")
    rows = write()
    return rows, list(outcomes.values())
