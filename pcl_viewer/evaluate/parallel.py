"""Run benchmark rows in parallel worker processes (``pcl bench --jobs N``).

Each unit of work (a row and one pre-training seed) runs in its own
``pcl bench --rows ROW --seeds S`` process, at most ``jobs`` at a time, taking the
next unit when one finishes (units differ in cost: "None" has no pre-training).
The processes share the cache: inputs are prepared once before (``--prepare``), and
every cell is its own atomically written file, so no two processes write the same file.
The parent shows one progress bar over the whole grid by counting finished cells.
Written by hand: ``concurrent.futures`` would run rows in this interpreter, where torch
threads and the pre-training's state would be shared between them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def count_cells(cells_dir: Path, slugs: Sequence[str]) -> int:
    """Finished cells of these rows (``cells_dir/<row>/seed<s>/fold<k>-<budget>.json``)."""
    return sum(len(list((Path(cells_dir) / s).glob("seed*/fold*-*.json"))) for s in slugs)


def run_rows_in_processes(units: Sequence[tuple[str, Sequence[str]]], jobs: int,
                          child_args: list[str], cells_dir: Path, expected: int, log_dir: Path,
                          command: str, echo: Callable[[str], None] = print,
                          poll_s: float = 2.0, show_progress: bool = True) -> dict[str, int]:
    """Run ``pcl bench <child_args> <unit args>`` for every unit, ``jobs`` at a time.

    Args:
        units: (name, arguments) of each process, e.g. ``("vader-seed1", ["--rows",
            "vader", "--seeds", "1"])``; the row is the name's part before ``-seed``.
        child_args: the ``pcl bench`` options every process gets (preset, cache,
            device, threads, loss ...), without ``--rows`` and ``--out``.
        cells_dir: where the cells appear (the progress bar counts them).
        expected: cells of the whole grid of these units (the bar's total).
        log_dir: one log per unit, ``<name>.log``.
        command: the user's command, recorded in every cell (``PCL_BENCH_COMMAND``).

    Returns:
        ``{name: exit status}`` (0 = the unit finished).
    """
    slugs = sorted({name.split("-seed")[0] for name, _ in units})
    from tqdm import tqdm

    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PCL_BENCH_COMMAND=command, PYTHONUNBUFFERED="1")
    pending, running, status = list(units), {}, {}
    bar = tqdm(total=expected, initial=count_cells(cells_dir, slugs), unit="cell",
               desc=f"bench ({jobs} processes)", disable=not show_progress)
    scratch = Path(tempfile.mkdtemp(prefix="pcl-bench-rows-"))
    try:
        while pending or running:
            while pending and len(running) < jobs:
                slug, unit_args = pending.pop(0)
                log = open(log_dir / f"{slug}.log", "w")  # closed when the process ends
                args = [sys.executable, "-m", "pcl_viewer.cli", "bench", *child_args,
                        *unit_args, "--out", str(scratch / slug),
                        "--figures", str(scratch / slug / "figures")]
                running[slug] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env), log)
            time.sleep(poll_s)
            for slug, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    status[slug] = proc.returncode
                    del running[slug]
                    if proc.returncode:
                        echo(f"{slug} failed (exit {proc.returncode}): see "
                             f"{log_dir / (slug + '.log')}")
            bar.n = count_cells(cells_dir, slugs)
            bar.refresh()
    finally:
        for proc, _ in running.values():  # interrupted: no orphan keeps computing
            proc.terminate()
        for proc, log in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        bar.close()
    return status
