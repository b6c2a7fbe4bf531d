"""Shared fixtures: tiny random bundles and a fake counterfactual model.

torch is imported here, before pytest-qt creates the QApplication: importing
torch after Qt has started its threads can deadlock on some platforms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: F401  (import order matters, see above)

from pcl_viewer.data.scan import Scan
from pcl_viewer.parents import PARENT_NAMES, PARENT_VALUES


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: the test machine is shared, and two threads on
    two busy cores stall on oversubscription. Restores the previous count."""
    from pcl_viewer.device import limited_threads

    with limited_threads(1):
        yield


def synthetic_chest(h: int = 256, w: int = 224, seed: int = 0) -> np.ndarray:
    """``(h, w)`` float32 [0, 1]: a bright thorax with two dark lung fields."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * 0.5, w * 0.5
    img = 0.55 + 0.25 * np.exp(-(((xx - cx) / (0.35 * w)) ** 2 + ((yy - cy) / (0.6 * h)) ** 2))
    for side in (-1, 1):
        lung = (((xx - cx - side * 0.2 * w) / (0.15 * w)) ** 2 + ((yy - cy) / (0.3 * h)) ** 2) < 1
        img[lung] -= 0.35
    img += rng.normal(0, 0.02, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


class FakeCounterfactualModel:
    """Same methods as ``CounterfactualModel`` (docs/CONTRACTS.md); deterministic, no weights.

    Parents are read from image statistics; a residual brightens the image for
    do(scanner=philips) and darkens the lower third for do(effusion=present).
    """

    def __init__(self, image_size: int = 64) -> None:
        self.image_size = image_size
        self.decodes = 0
        self.abductions = 0

    def infer_parents(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = x.mean(dim=(1, 2, 3))
        return {"scanner": torch.sigmoid((m - 0.5) * 20), "sex": torch.full_like(m, 0.3),
                "effusion": torch.full_like(m, 0.2)}

    def abduct(self, x: torch.Tensor, parents: torch.Tensor) -> dict:
        self.abductions += 1
        return {"x": x, "pa": torch.as_tensor(parents)}

    def residual(self, abduction: dict, do, strength: float = 1.0) -> torch.Tensor:
        self.decodes += 1
        x = abduction["x"]
        if isinstance(do, torch.Tensor):  # target parents (B, 3), like CounterfactualModel
            dos = [{n: PARENT_VALUES[n][int(t[i])] for i, n in enumerate(PARENT_NAMES)
                    if int(t[i]) != int(p[i])} for t, p in zip(do, abduction["pa"])]
        else:
            dos = [do] * len(x)
        out = torch.zeros_like(x)
        s = x.shape[-1]
        for b, d in enumerate(dos):
            if d.get("scanner") == "philips":
                out[b] += 0.08
            elif d.get("scanner") == "imagingdynamics":
                out[b] -= 0.08
            if d.get("effusion") == "present":
                out[b, :, 2 * s // 3 :] += 0.3
            elif d.get("effusion") == "absent":
                out[b, :, 2 * s // 3 :] -= 0.3
            if "sex" in d:
                out[b, :, :, : s // 8] += 0.05
        return strength * out


@pytest.fixture(scope="session")
def seg_bundle_path(tmp_path_factory):
    """A randomly initialised smoke-size segmentation bundle (kind "segmentation")."""
    from pcl_viewer.models.bundle import save_bundle
    from pcl_viewer.models.unet import UNetConfig, build_unet

    torch.manual_seed(0)
    net = build_unet("smoke")
    path = tmp_path_factory.mktemp("bundles") / "seg-smoke"
    save_bundle(path, {"name": "seg-smoke", "version": "0", "kind": "segmentation"},
                {"unet": ("dense-unet", {"unet": UNetConfig.for_preset("smoke").to_dict(),
                                         "heads": ["seg"]}, net)})
    return path


@pytest.fixture
def fake_pipeline(seg_bundle_path):
    """A Pipeline with the fake CF model and a random smoke U-Net, on the CPU."""
    from pcl_viewer.models.bundle import ModelBundle
    from pcl_viewer.pipeline import BundleInfo, Pipeline

    b = ModelBundle.load(seg_bundle_path)
    bundles = {"cf": BundleInfo("fake-cf", "0" * 12, "<test>"),
               "seg": BundleInfo(b.name, b.fingerprint, str(seg_bundle_path))}
    return Pipeline(FakeCounterfactualModel(), b.build("unet"), "cpu", bundles)


@pytest.fixture
def chest_scan() -> Scan:
    return Scan(synthetic_chest(), spacing=(0.5, 0.4), name="chest", metadata={"source": "test"})


@pytest.fixture(scope="session")
def cf_bundle_path(tmp_path_factory):
    """A randomly initialised smoke-size counterfactual bundle (HVAE + classifiers)."""
    from pcl_viewer.models.bundle import save_bundle
    from pcl_viewer.models.classifiers import build_classifiers
    from pcl_viewer.models.hvae import build_hvae

    torch.manual_seed(0)
    hvae, clf = build_hvae("smoke"), build_classifiers("smoke")
    path = tmp_path_factory.mktemp("bundles") / "cf-smoke"
    save_bundle(path, {"name": "cf-smoke", "version": "0", "kind": "counterfactual"},
                {"hvae": ("hvae", {"hvae": hvae.cfg.to_dict()}, hvae),
                 "classifier": ("attribute-classifier", {"classifier": clf.cfg.to_dict()}, clf)})
    return path
