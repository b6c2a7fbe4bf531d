"""Long use keeps resident memory flat: many scans in a row through the review loop and
through the viewer's pipeline (open, counterfactuals, segment, CHRO-map, drop the result).

Criterion: RSS growth under 10 % after the first 20 scans. The suite runs
40 small scans; ``PCL_MEMORY_SCANS=200`` runs the full figure and prints it:

    PCL_MEMORY_SCANS=200 .venv/bin/python -m pytest -q -s tests/test_memory.py
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from pcl_viewer.review import ReviewConfig, iter_review
from tests.test_interrupt import random_cf_bundle
from tests.test_review import write_scans

N_SCANS = int(os.environ.get("PCL_MEMORY_SCANS", "40"))
SIZE = int(os.environ.get("PCL_MEMORY_SIZE", "128"))
WARM_UP = 20
MAX_GROWTH = 0.10
pytestmark = pytest.mark.slow


def rss_mb() -> float:
    """Resident set size of this process in MiB (after a collection, so garbage is not counted)."""
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def growth(samples: list[tuple[int, float]]) -> tuple[float, float, float]:
    """``(rss after the warm-up, max rss after it, relative growth)`` of ``(scans, MiB)`` samples."""
    base = next(mb for n, mb in samples if n >= WARM_UP)
    peak = max(mb for n, mb in samples if n >= WARM_UP)
    return base, peak, (peak - base) / base


@pytest.fixture(scope="module")
def scans_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("memory") / "in"
    write_scans(folder, N_SCANS, size=(SIZE, SIZE * 7 // 8))
    return folder


@pytest.fixture(scope="module")
def real_pipeline(tmp_path_factory, seg_bundle_path):
    """Random smoke bundles through the real loaders (no fakes: leaks would be in real code)."""
    from pcl_viewer.pipeline import Pipeline

    cf = random_cf_bundle(tmp_path_factory.mktemp("cf") / "cf-smoke")
    return Pipeline.from_bundles(cf, seg_bundle_path, "cpu")


def test_review_loop_keeps_resident_memory_flat(tmp_path, scans_folder, real_pipeline):
    samples = []
    gen = iter_review(scans_folder, tmp_path / "out", real_pipeline,
                      ReviewConfig(batch_size=4, threshold=1.0))  # thumbnails for every scan
    for step in gen:
        samples.append((step.done, rss_mb()))
    base, peak, g = growth(samples)
    print(f"\nreview: {N_SCANS} scans, RSS after {WARM_UP}: {base:.0f} MiB, "
          f"max after: {peak:.0f} MiB, growth {g:+.1%}")
    assert samples[-1][0] == N_SCANS
    assert g < MAX_GROWTH, samples


def test_viewer_pipeline_loop_keeps_resident_memory_flat(scans_folder, real_pipeline):
    from pcl_viewer.data.readers import read_scan

    samples = []
    for i, path in enumerate(sorted(scans_folder.glob("*.png")), start=1):
        scan = read_scan(path)  # open
        result = real_pipeline.run_sync(scan, chromap=True)  # CFs, segment, CHRO-map
        assert result.chromap is not None and len(result.views) == 4
        del result, scan  # close the layers: nothing of the scan may stay referenced
        samples.append((i, rss_mb()))
    base, peak, g = growth(samples)
    print(f"\npipeline: {N_SCANS} scans, RSS after {WARM_UP}: {base:.0f} MiB, "
          f"max after: {peak:.0f} MiB, growth {g:+.1%}")
    assert g < MAX_GROWTH, samples
