"""The domain check: calibration file, fingerprint match, scores and flags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pcl_viewer.domain import UNCALIBRATED, Calibration, DomainCheck, calibrate
from pcl_viewer.paths import models_dir


def _calibration(fingerprint: str = "abc") -> Calibration:
    z = np.sort(np.abs(np.linspace(-3, 3, 101)))
    return Calibration(median=5.0, spread=0.5, threshold=2.5, z_sorted=z.tolist(),
                       fingerprints={"cf": fingerprint})


def test_score_is_the_held_out_quantile_and_the_threshold_flags():
    cal = _calibration()
    assert cal.score(cal.z(5.0)) == 1.0  # at the median: every held-out scan is as far
    assert cal.score(cal.z(5.0 + 0.5 * 3.5)) == 0.0  # beyond every held-out scan
    assert cal.score(1.5) == pytest.approx(51 / 101, abs=0.02)
    check = DomainCheck(object(), cal, statistic=lambda cf, x, pa, cancel=None: [5.1, 7.0, 3.0])
    typical, high, low = check.score(np.zeros((3, 4, 4)), [None] * 3)
    assert typical.out_of_domain is False and typical.score > 0.8
    assert high.out_of_domain is True and low.out_of_domain is True  # both tails count
    assert "OUT OF DOMAIN" in high.message


def test_calibration_records_the_bundle_and_other_bundles_are_uncalibrated(
        cf_bundle_path, seg_bundle_path, tmp_path):
    from pcl_viewer.pipeline import Pipeline

    path = tmp_path / "domain.json"
    cal = calibrate(cf_bundle_path, seg_bundle_path, n=20, seed=11, size=96, out=path)
    saved = json.loads(path.read_text())
    pipe = Pipeline.from_bundles(cf_bundle_path, seg_bundle_path, "cpu")
    assert saved["fingerprints"]["cf"] == pipe.bundles["cf"].fingerprint == cal.fingerprints["cf"]
    assert len(saved["z_sorted"]) == 20 and saved["info"]["flagged_in_sample"] <= 1
    pipe.domain_path = path
    result = pipe.run_sync(_noise(96), interventions=(), segment=False)
    assert result.domain.bpd is not None and 0.0 <= result.domain_score <= 1.0
    assert result.metadata()["out_of_domain"] is result.out_of_domain

    saved["fingerprints"]["cf"] = "0" * 12
    path.write_text(json.dumps(saved))
    other = Pipeline.from_bundles(cf_bundle_path, None, "cpu")
    other.domain_path = path
    result = other.run_sync(_noise(96), interventions=(), segment=False)
    assert result.domain_score is None and result.out_of_domain is None
    assert result.domain.message.startswith(UNCALIBRATED)


def _noise(size: int, seed: int = 0):
    from pcl_viewer.data.scan import Scan

    rng = np.random.default_rng(seed)
    return Scan(rng.random((size, size)).astype(np.float32), name="noise")


def _shipped_check():
    from pcl_viewer.pipeline import Pipeline

    if not (models_dir() / "cf-cpu").is_dir() or not (models_dir() / "domain.json").is_file():
        pytest.skip("no shipped cf-cpu bundle or domain calibration")
    pipe = Pipeline.from_bundles("cf-cpu", None, "cpu")
    if not pipe.domain.calibrated:
        pytest.skip(f"shipped calibration does not match cf-cpu: {pipe.domain.reason}")
    return pipe


def test_the_shipped_models_flag_a_photo_and_noise_but_not_a_phantom_scan():
    from skimage import data

    from pcl_viewer.data.scan import Scan

    pipe = _shipped_check()
    photo = Scan(data.camera().astype(np.float32) / 255.0, name="camera")
    flags = {s.name: pipe.run_sync(s, interventions=(), segment=False).out_of_domain
             for s in (photo, _noise(512))}
    assert flags == {"camera": True, "noise": True}


def phantom_scans(folder, n: int, seed: int, regime: str | None = None) -> list:
    """``n`` fresh phantom scans of the training styles (256 px) in the given regime."""
    from pcl_viewer.data.dataset import load_dataset
    from pcl_viewer.data.phantom.generate import generate
    from pcl_viewer.data.scan import Scan

    generate(folder, n, 256, seed, workers=1,
             **({"regime": regime} if regime and regime != "default" else {}))
    ds = load_dataset(folder)
    return [Scan(ds.image(i), name=f"phantom{i}") for i in range(len(ds))]


def test_the_shipped_models_flag_at_most_one_in_twenty_fresh_phantom_scans(tmp_path):
    pipe = _shipped_check()
    regime = pipe.domain.calibration.info.get("regime")  # the look it was calibrated on
    scans = phantom_scans(tmp_path / "ph", 20, seed=60_001, regime=regime)
    flags = [pipe.run_sync(s, interventions=(), segment=False).out_of_domain for s in scans]
    assert sum(flags) <= 1  # at most 5 % of in-domain scans flagged
