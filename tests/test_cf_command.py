"""`pcl cf`: one counterfactual of a scan of any size, through the pipeline."""

from __future__ import annotations

import ast

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pcl_viewer.commands.cf import cf
from pcl_viewer.data.scan import Scan
from pcl_viewer.pipeline import Pipeline
from tests.conftest import synthetic_chest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("cf") / "scan.png"
    Image.fromarray(np.round(synthetic_chest(150, 120) * 65535).astype(np.uint16)).save(path)
    return path


def _cf(scan_png, bundle, out, *args):
    res = CliRunner().invoke(cf, [str(scan_png), "--bundle", str(bundle), "--out", str(out),
                                  *args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output, np.asarray(Image.open(out))


def test_writes_the_pipelines_counterfactual_at_native_size(scan_png, cf_bundle_path, tmp_path):
    output, png = _cf(scan_png, cf_bundle_path, tmp_path / "cf.png", "--do", "effusion=present")
    assert png.shape == (150, 120) and png.dtype == np.uint16
    pipe = Pipeline.from_bundles(cf_bundle_path, None, device="cpu")
    from pcl_viewer.data.readers import read_scan

    want = pipe.counterfactual(Scan(read_scan(scan_png).image), {"effusion": "present"})
    np.testing.assert_array_equal(png, np.round(want.views["counterfactual"].image * 65535))
    assert f"parents {want.parents.to_dict()} (inferred P(" in output


def test_given_parents_are_used_and_named_as_given(scan_png, cf_bundle_path, tmp_path):
    output, _ = _cf(scan_png, cf_bundle_path, tmp_path / "cf.png", "--do", "scanner=philips",
                    "--parents", "scanner=imagingdynamics,sex=male,effusion=absent")
    assert ("parents {'scanner': 'imagingdynamics', 'sex': 'male', 'effusion': 'absent'} "
            "(given)") in output


def _parents(output: str) -> dict[str, str]:
    """The parents dict `pcl cf` printed."""
    return ast.literal_eval(output[output.index("{"):output.index("}") + 1])


def test_a_partial_parent_override_infers_the_others(scan_png, cf_bundle_path, tmp_path):
    inferred, _ = _cf(scan_png, cf_bundle_path, tmp_path / "a.png", "--do", "scanner=philips")
    partial, _ = _cf(scan_png, cf_bundle_path, tmp_path / "b.png", "--do", "scanner=philips",
                     "--parents", "sex=male")
    assert _parents(partial) == _parents(inferred) | {"sex": "male"}
    assert "; given sex=male)" in partial


def test_an_invalid_parent_is_a_usage_error(scan_png, cf_bundle_path, tmp_path):
    res = CliRunner().invoke(cf, [str(scan_png), "--bundle", str(cf_bundle_path), "--out",
                                  str(tmp_path / "x.png"), "--do", "sex=male",
                                  "--parents", "sex=unknown"])
    assert res.exit_code == 2 and "--parents" in res.output
