"""Run benchmark rows in parallel worker processes (``pcl bench --jobs N``).

Each row runs in its own ``pcl bench --rows ROW`` process, at most ``jobs`` at a time,
taking the next row when one finishes (rows differ in cost: "None" has no pre-training).
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
    """Finished cells of these rows (files ``cells_dir/<row>/fold<k>-<budget>.json``)."""
    return sum(len(list((Path(cells_dir) / s).glob("fold*-*.json"))) for s in slugs)


def run_rows_in_processes(slugs: Sequence[str], jobs: int, child_args: list[str],
                          cells_dir: Path, expected: int, log_dir: Path, command: str,
                          echo: Callable[[str], None] = print, poll_s: float = 2.0,
                          show_progress: bool = True) -> dict[str, int]:
    """Run ``pcl bench <child_args> --rows SLUG`` for every slug, ``jobs`` at a time.

    Args:
        child_args: the ``pcl bench`` options every row process gets (preset, cache,
            device, threads, loss ...), without ``--rows`` and ``--out``.
        cells_dir: where the cells appear (the progress bar counts them).
        expected: cells of the whole grid of these rows (the bar's total).
        log_dir: one log per row, ``<slug>.log``.
        command: the user's command, recorded in every cell (``PCL_BENCH_COMMAND``).

    Returns:
        ``{slug: exit status}`` (0 = the row finished).
    """
    from tqdm import tqdm

    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PCL_BENCH_COMMAND=command, PYTHONUNBUFFERED="1")
    pending, running, status = list(slugs), {}, {}
    bar = tqdm(total=expected, initial=count_cells(cells_dir, slugs), unit="cell",
               desc=f"bench ({jobs} processes)", disable=not show_progress)
    scratch = Path(tempfile.mkdtemp(prefix="pcl-bench-rows-"))
    try:
        while pending or running:
            while pending and len(running) < jobs:
                slug = pending.pop(0)
                log = open(log_dir / f"{slug}.log", "w")  # closed when the process ends
                args = [sys.executable, "-m", "pcl_viewer.cli", "bench", *child_args,
                        "--rows", slug, "--out", str(scratch / slug),
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
                        echo(f"row {slug} failed (exit {proc.returncode}): see "
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
