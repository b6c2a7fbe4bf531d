"""Parents, interventions, native<->model geometry and the CLI entry point."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from pcl_viewer.data.preprocess import to_model
from pcl_viewer.parents import Parents, intervention_name, parse_do, standard_interventions


def test_parents_vector_round_trip_and_validation():
    p = Parents("philips", "female", "present")
    assert p.to_vector().tolist() == [1.0, 0.0, 1.0]
    assert Parents.from_vector(p.to_vector()) == p
    with pytest.raises(ValueError, match="invalid scanner='portable'"):
        Parents("portable", "male", "absent")


def test_standard_interventions_flip_each_binary_parent():
    p = Parents("imagingdynamics", "male", "absent")
    views = standard_interventions(p)
    assert p.intervene(views["scanner"]).scanner == "philips"
    assert p.intervene(views["effusion"]).effusion == "present"
    both = p.intervene(views["both"])
    assert (both.scanner, both.effusion, both.sex) == ("philips", "present", "male")


def test_parse_do_and_names():
    assert parse_do(["scanner=philips", "effusion=present"]) == {
        "scanner": "philips", "effusion": "present"}
    with pytest.raises(ValueError, match="unknown parent"):
        parse_do(["age=3"])
    assert intervention_name({"scanner": "philips"}) == "do(scanner=philips)"
    assert "extrapolated" in intervention_name({"scanner": "philips"}, 1.5)
    half = intervention_name({"scanner": "philips"}, 0.5)
    assert half.endswith("x0.5") and "extrapolated" not in half


def test_geometry_maps_model_outputs_back_to_non_square_native():
    rng = np.random.default_rng(0)
    img = rng.random((300, 180), dtype=np.float32)
    small, geom = to_model(img, 64)
    assert small.shape == (64, 64) and small.dtype == np.float32
    labels = (small > 0.5).astype(np.uint8) * 2
    native = geom.to_native(labels, nearest=True)
    assert native.shape == (300, 180) and set(np.unique(native)) <= {0, 2}
    # A constant model-size field maps to the same constant at native size.
    assert np.allclose(geom.to_native(np.full((64, 64), 0.25, np.float32)), 0.25)


def test_cli_help_is_fast_and_lists_commands():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pcl_viewer.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert time.perf_counter() - t0 < 5.0
    for cmd in ("phantom", "train-cf", "pretrain", "bench", "chromap", "review"):
        assert cmd in out
    mods = subprocess.run([sys.executable, "-c",
                           "import sys, pcl_viewer.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert mods == "False"
