"""Malformed and tampered bundles: each refused with one BundleError line, before allocation.

Every variant is built here from a small valid bundle. All of them are loaded (and, if
the load passes, built) in one subprocess whose peak RSS is compared with its RSS
before the first variant: a card that makes the loader allocate its huge network (e.g.
channels 4096 allocated 1.15 GB before) would show up there.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pcl_viewer.models.bundle import BundleError, ModelBundle, sha256_file
from pcl_viewer.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
Mutate = Callable[[Path], None]


def make_base(path: Path) -> Path:
    """A valid smoke-size segmentation bundle."""
    import torch

    from pcl_viewer.models.bundle import save_bundle
    from pcl_viewer.models.unet import UNetConfig, build_unet

    torch.manual_seed(0)
    cfg = UNetConfig.for_preset("smoke")
    save_bundle(path, {"name": "base", "version": "0", "kind": "segmentation",
                       "input": {"size": 64, "intensity": "float32 [0, 1]"}},
                {"unet": ("dense-unet", {"unet": cfg.to_dict(), "heads": ["seg"]},
                          build_unet(cfg))})
    return path


def _card(p: Path) -> dict:
    return json.loads((p / "card.json").read_text())


def _put(p: Path, card: object) -> None:
    (p / "card.json").write_text(json.dumps(card))


def _edit(fn: Callable[[dict], None]) -> Mutate:
    def mutate(p: Path) -> None:
        card = _card(p)
        fn(card)
        _put(p, card)
    return mutate


def _unet(key: str, value: object) -> Mutate:
    return _edit(lambda c: c["components"]["unet"]["config"]["unet"].__setitem__(key, value))


def _comp(key: str, value: object) -> Mutate:
    return _edit(lambda c: c["components"]["unet"].__setitem__(key, value))


def _input(key: str, value: object) -> Mutate:
    return _edit(lambda c: c["input"].__setitem__(key, value))


def _raw(text: str) -> Mutate:
    return lambda p: (p / "card.json").write_text(text)


def _weights(data: bytes) -> Mutate:
    """Replace the weight file with ``data`` and put its true sha256 in the card."""
    def mutate(p: Path) -> None:
        (p / "unet.safetensors").write_bytes(data)
        card = _card(p)
        card["components"]["unet"]["sha256"] = sha256_file(p / "unet.safetensors")
        _put(p, card)
    return mutate


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pcl-bundle-pwned",))


def _header(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _symlink_out(p: Path) -> None:
    outside = p.parent / "outside.safetensors"
    shutil.copy(p / "unet.safetensors", outside)
    (p / "unet.safetensors").unlink()
    os.symlink(outside, p / "unet.safetensors")


VARIANTS: dict[str, Mutate] = {
    "card is a list": _raw("[]"),
    "card is a string": _raw('"card"'),
    "card is not JSON": _raw("{"),
    "card over 1 MiB": _edit(lambda c: c.__setitem__("description", "x" * (2 << 20))),
    "card with a duplicate key": lambda p: _raw(
        (p / "card.json").read_text().replace('"name"', '"kind": "x", "name"', 1))(p),
    "card nested 100000 deep": _raw("[" * 100_000 + "]" * 100_000),
    "wrong format": _edit(lambda c: c.__setitem__("format", "pcl-bundle/0")),
    "no components": _edit(lambda c: c.__setitem__("components", {})),
    "components a list": _edit(lambda c: c.__setitem__("components", [1])),
    "unknown top-level key": _edit(lambda c: c.__setitem__("exec", "rm -rf /")),
    "name an integer": _edit(lambda c: c.__setitem__("name", 7)),
    "labels a list": _edit(lambda c: c.__setitem__("labels", ["a"])),
    "unknown component key": _comp("hook", "os.system"),
    "missing sha256": _edit(lambda c: c["components"]["unet"].pop("sha256")),
    "sha256 not hex": _comp("sha256", "z" * 64),
    "unknown architecture": _comp("architecture", "evil-net"),
    "architecture an integer": _comp("architecture", 3),
    "config a string": _comp("config", "channels=4096"),
    "config.unet a list": _edit(lambda c: c["components"]["unet"]["config"].__setitem__(
        "unet", [1, 2])),
    "unknown config key": _unet("exec", 1),
    "negative channels": _unet("channels", [-8, 16, 32]),
    "channels 4096": _unet("channels", [4096, 16, 32]),
    "channels a string": _unet("channels", "abc"),
    "channels booleans": _unet("channels", [True, 16, 32]),
    "channels floats": _unet("channels", [8.0, 16, 32]),
    "1000 stages": _unet("channels", [8] * 1000),
    "image size 0": _unet("image_size", 0),
    "image size 'abc'": _unet("image_size", "abc"),
    "image size 1e6": _unet("image_size", 1e6),
    "image size 2^62": _unet("image_size", 2**62),
    "image size Infinity": lambda p: (_unet("image_size", "__inf__")(p), _raw(
        (p / "card.json").read_text().replace('"__inf__"', "Infinity"))(p)),
    "1000 residual units": _unet("num_res_units", 1000),
    "unknown head": _edit(lambda c: c["components"]["unet"]["config"].__setitem__(
        "heads", ["evil"])),
    "input size 0": _input("size", 0),
    "input size 'abc'": _input("size", "abc"),
    "input size 1e6": _input("size", 1e6),
    "unknown input key": _input("loader", "pickle"),
    "absolute file path": _comp("file", "/etc/passwd"),
    "file path with ..": _comp("file", "../unet.safetensors"),
    "file in a subfolder": _comp("file", "sub/unet.safetensors"),
    "Windows absolute path": _comp("file", "C:\\\\weights.safetensors"),
    "file not .safetensors": _comp("file", "card.json"),
    "file links outside the bundle": _symlink_out,
    "pickle renamed .safetensors": _weights(pickle.dumps(_Boom())),
    "header claiming 2^62 bytes": _weights(struct.pack("<Q", 2**62) + b"{}" * 8),
    "header not JSON": _weights(struct.pack("<Q", 4) + b"{{{{"),
    "tensor beyond the data": _weights(_header(
        {"w": {"dtype": "F32", "shape": [1024, 1024], "data_offsets": [0, 4 * 1024 * 1024]}},
        b"\0" * 16)),
    "tensor of unknown dtype": _weights(_header(
        {"w": {"dtype": "OBJ", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)),
    "pickle file beside the weights": lambda p: (p / "extra.pkl").write_bytes(
        pickle.dumps(_Boom())),
    "config not matching the weights": _unet("channels", [8, 16, 64]),
    "huge network within bounds": _edit(lambda c: c["components"]["unet"]["config"][
        "unet"].update(channels=[1024] * 8, num_res_units=8)),
}

_RUNNER = """
import json, resource, sys, shutil
from pathlib import Path
import torch
from tests.test_bundle_hostile import VARIANTS, make_base
from pcl_viewer.models.bundle import BundleError, ModelBundle

root = Path(sys.argv[1])
base = make_base(root / "base")
ModelBundle.load(base).build("unet")  # the valid bundle: imports and a real build first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for name, mutate in VARIANTS.items():
    p = root / name.replace(" ", "_").replace("/", "_")
    shutil.copytree(base, p, symlinks=True)
    mutate(p)
    try:
        ModelBundle.load(p).build("unet")
        out[name] = "LOADED"
    except BundleError as exc:
        out[name] = str(exc)
    except BaseException as exc:
        out[name] = f"RAW {type(exc).__name__}: {exc}"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": out, "growth_kib": after - before}))
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(root)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_malformed_bundle_is_refused_with_one_bundle_error_line(hostile_results):
    assert len(VARIANTS) >= 40
    results = hostile_results["results"]
    bad = {k: v for k, v in results.items() if v == "LOADED" or v.startswith("RAW ")}
    assert not bad, bad
    for name, msg in results.items():
        assert "\n" not in msg and 10 < len(msg) < 600, (name, msg)
    assert not Path("/tmp/pcl-bundle-pwned").exists()  # no pickle ran


@pytest.mark.parametrize(("variant", "says"), [
    ("card is a list", "must be a JSON object, got list"),
    ("channels 4096", "4096 is out of bounds 1..1024"),
    ("negative channels", "-8 is out of bounds"),
    ("image size 1e6", "must be an integer"),
    ("channels booleans", "must be an integer"),
    ("unknown top-level key", "unknown key 'exec'"),
    ("unknown config key", "unknown key 'exec'"),
    ("absolute file path", "absolute path"),
    ("file path with ..", "not a file name inside the bundle"),
    ("pickle renamed .safetensors", "not a safetensors file"),
    ("header claiming 2^62 bytes", "claims 4611686018427387904 bytes"),
    ("file links outside the bundle", "outside the bundle folder"),
    ("card with a duplicate key", "duplicate key"),
    ("card over 1 MiB", "at most 1048576"),
    ("config not matching the weights", "do not fit"),
    ("huge network within bounds", "do not fit"),
])
def test_a_refusal_says_what_is_wrong(hostile_results, variant, says):
    assert says in hostile_results["results"][variant]


def test_nothing_big_is_allocated_before_a_refusal(hostile_results):
    """Peak RSS over all variants: within 64 MiB of the RSS after one real build. The
    in-bounds [1024] x 8 network alone has hundreds of millions of parameters."""
    assert hostile_results["growth_kib"] < 64 * 1024, hostile_results["growth_kib"]


# ------------------------------------------------------------------------ pins


def _shipped_copy(tmp_path: Path, monkeypatch, name: str = "seg-cpu") -> Path:
    from pcl_viewer import paths

    shutil.copytree(paths.models_dir() / name, tmp_path / "models" / name)
    monkeypatch.setenv("PCL_VIEWER_RESOURCES", str(tmp_path))
    return tmp_path / "models" / name


def test_a_tampered_shipped_bundle_with_a_consistent_card_is_refused(tmp_path, monkeypatch):
    bundle = _shipped_copy(tmp_path, monkeypatch)
    assert ModelBundle.load(bundle).verified
    wfile = bundle / "unet.safetensors"
    data = bytearray(wfile.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # one weight becomes +inf
    wfile.write_bytes(bytes(data))
    card = _card(bundle)
    card["components"]["unet"]["sha256"] = sha256_file(wfile)  # the card agrees
    (bundle / "card.json").write_text(json.dumps(card, indent=2))
    with pytest.raises(BundleError, match="does not match its pin") as err:
        ModelBundle.load(bundle)
    assert "python -m pcl_viewer.models.bundle --pin resources/models/seg-cpu" in str(err.value)


def test_a_user_bundle_loads_unverified_with_its_fingerprint(tmp_path):
    bundle = ModelBundle.load(make_base(tmp_path / "mine"))
    assert bundle.verified is False
    assert bundle.fingerprint in bundle.notice and "unverified" in bundle.notice


def test_the_shipped_bundles_match_their_pins():
    """Fails when a shipped bundle was replaced without re-pinning; the message says how."""
    from pcl_viewer.models.bundle import PIN_COMMAND, load_pins
    from pcl_viewer.paths import models_dir

    pins = load_pins()
    assert {"seg-cpu", "cf-cpu"} <= set(pins)
    for folder in sorted(p for p in models_dir().iterdir() if (p / "card.json").is_file()):
        how = (f"re-pin it if it was replaced on purpose: {PIN_COMMAND.format(name=folder.name)}"
               " and commit pcl_viewer/models/shipped.json")
        assert folder.name in pins, f"{folder} is shipped but not pinned; {how}"
        try:
            bundle = ModelBundle.load(folder)
        except BundleError as exc:
            pytest.fail(f"{exc}; {how}")
        assert bundle.verified, f"{folder} is not verified; {how}"


def test_every_config_field_has_bounds():
    """Each field of a network config is bounded: explicitly, or by its annotated type (a
    field added later, e.g. an int, gets -1024..1024). A field of a type without bounds
    would make every bundle refused, with a message saying where to add them."""
    from dataclasses import fields

    from pcl_viewer.models import bundle as b
    from pcl_viewer.models.classifiers import ClassifierConfig
    from pcl_viewer.models.hvae import HVAEConfig
    from pcl_viewer.models.unet import UNetConfig

    for arch, cls in (("dense-unet", UNetConfig), ("hvae", HVAEConfig),
                      ("attribute-classifier", ClassifierConfig)):
        assert set(b.config_fields(arch)) == {f.name for f in fields(cls)}
    with pytest.raises(b._Invalid, match="out of bounds -1024..1024"):
        b.GENERIC_BOUNDS["int"](4096, "x")
    for preset in PRESETS:  # every preset's config passes its schema
        for arch, cls in (("dense-unet", UNetConfig), ("hvae", HVAEConfig),
                          ("attribute-classifier", ClassifierConfig)):
            key = b.CONFIG_CLASSES[arch][0]
            config = json.loads(json.dumps({key: cls.for_preset(preset).to_dict()}))
            b._config_schema(arch)(config, arch)
