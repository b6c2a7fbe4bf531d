"""Model bundles: round trip, hash verification, and refusal of tampered folders."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pcl_viewer.models.bundle import BundleError, ModelBundle, save_bundle
from pcl_viewer.models.unet import UNetConfig, build_unet


def _save(tmp_path, name="b"):
    cfg = UNetConfig.for_preset("smoke")
    net = build_unet(cfg)
    config = {"unet": cfg.to_dict(), "heads": ["seg"]}
    card = {"name": "tiny", "version": "0", "kind": "segmentation"}
    return net, save_bundle(tmp_path / name, card, {"unet": ("dense-unet", config, net)})


def _edit_unet_card(bundle: ModelBundle, **fields) -> None:
    """Overwrite fields of the card's ``unet`` component (the weights stay as they are)."""
    path = bundle.path / "card.json"
    card = json.loads(path.read_text())
    card["components"]["unet"].update(fields)
    path.write_text(json.dumps(card))


def test_round_trip_rebuilds_identical_network(tmp_path):
    net, bundle = _save(tmp_path)
    rebuilt = ModelBundle.load(bundle.path, kind="segmentation").build("unet")
    x = torch.rand(1, 1, 64, 64)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), rebuilt(x), atol=1e-6)
    assert len(bundle.fingerprint) == 12


def test_changed_weight_file_is_refused(tmp_path):
    _, bundle = _save(tmp_path)
    wfile = bundle.path / "unet.safetensors"
    data = bytearray(wfile.read_bytes())
    data[-1] ^= 0xFF
    wfile.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        ModelBundle.load(bundle.path)


def test_unknown_architecture_is_refused(tmp_path):
    _, bundle = _save(tmp_path)
    _edit_unet_card(bundle, architecture="evil-net")
    with pytest.raises(BundleError, match="unknown architecture 'evil-net'"):
        ModelBundle.load(bundle.path)


def test_pickle_in_folder_is_refused_without_unpickling(tmp_path, monkeypatch):
    _, bundle = _save(tmp_path)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (bundle.path / "weights.pt").write_bytes(pickle.dumps(Boom()))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(BundleError, match="pickle"):
        ModelBundle.load(bundle.path)


def test_weights_of_wrong_shape_are_refused(tmp_path):
    _, bundle = _save(tmp_path)
    _edit_unet_card(bundle, config={"unet": {**UNetConfig.for_preset("smoke").to_dict(),
                                             "channels": [8, 16, 64]}, "heads": ["seg"]})
    with pytest.raises(BundleError, match="do not fit"):
        ModelBundle.load(bundle.path).build("unet")


def test_wrong_kind_and_missing_folder_give_clear_errors(tmp_path):
    _, bundle = _save(tmp_path)
    with pytest.raises(BundleError, match="expected 'counterfactual'"):
        ModelBundle.load(bundle.path, kind="counterfactual")
    with pytest.raises(BundleError, match="not a bundle folder"):
        ModelBundle.load(tmp_path / "nope")


def test_save_replaces_an_existing_bundle_atomically(tmp_path):
    _save(tmp_path)
    _, again = _save(tmp_path)
    assert ModelBundle.load(again.path).name == "tiny"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
