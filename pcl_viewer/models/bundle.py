"""Model bundles: a folder with ``card.json`` and safetensors weight files.

The card names the architecture of every component, its config, the parent
encodings, input size and intensity convention, training data and command,
metrics, and the sha256 of every weight file. Nothing is ever unpickled.

Loading refuses, with one-line :class:`BundleError` messages and before any
weight or network is allocated:

- pickle-capable files in the folder; a card over 1 MiB, not JSON, with duplicate keys;
- a card that does not follow the schema below: unknown keys, wrong types, an
  architecture parameter out of its bounds (e.g. channels 1..1024, image size 16..1024),
  a component ``file`` that is not a plain file name inside the bundle;
- a weight file whose safetensors header is not sane (length beyond the file, tensors
  outside the data, sizes that do not add up) or whose sha256 differs from the card;
- at :meth:`ModelBundle.build`, a config whose network (built first on PyTorch's
  ``meta`` device, which allocates nothing) has other tensor names or shapes than the file;
- a shipped bundle (``resources/models/NAME``) whose digest differs from its pin in
  ``pcl_viewer/models/shipped.json``: the card's own sha256s cannot vouch for it, since
  whoever edits the weights can edit the card too. Other bundles load with
  ``verified = False`` and a :attr:`ModelBundle.notice` naming their fingerprint.

Re-pin a shipped bundle after replacing it on purpose (then commit shipped.json)::

    python -m pcl_viewer.models.bundle --pin resources/models/NAME

Layout::

    BUNDLE/
      card.json
      <component>.safetensors     (one per component, e.g. unet, hvae, classifier)

Card schema (``format: pcl-bundle/1``)::

    {"format": "pcl-bundle/1", "name": str, "version": str, "kind": str,
     "components": {"unet": {"architecture": "dense-unet", "config": {...},
                             "file": "unet.safetensors", "sha256": "..."}},
     "parents": {...}, "input": {"size": 128, "intensity": "float32 [0, 1]"},
     "training": {"command": str, "seed": int, "data": str}, "metrics": {...}}
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from torch import nn

FORMAT = "pcl-bundle/1"
CARD = "card.json"
PINS_FILE = Path(__file__).with_name("shipped.json")
PIN_COMMAND = "python -m pcl_viewer.models.bundle --pin resources/models/{name}"
# Extensions that may hold pickles. Their mere presence refuses the bundle:
# a tampered folder is not silently "cleaned" by ignoring files.
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz"}
MAX_CARD_BYTES = 1 << 20
MAX_WEIGHT_BYTES = 4 << 30
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 10_000
# safetensors dtype -> bytes per element
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2,
                      "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                      "U64": 8, "F64": 8}

# architecture name -> "module:builder"; builder(config: dict) -> torch.nn.Module.
# Modules are imported lazily so the registry costs nothing at start-up.
ARCHITECTURES: dict[str, str] = {
    "dense-unet": "pcl_viewer.models.unet:build_from_config",
    "hvae": "pcl_viewer.models.hvae:build_from_config",
    "attribute-classifier": "pcl_viewer.models.classifiers:build_from_config",
}


class BundleError(ValueError):
    """A bundle that cannot be used; the message (one line) names the bundle and the problem."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- schema
# A small declarative validator, hand-written: jsonschema and pydantic are not
# dependencies of the core package, and the bounds need one line per refusal anyway.

Check = Callable[[Any, str], None]


class _Invalid(Exception):
    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)


def _show(x: Any) -> str:
    text = json.dumps(x, default=str) if not isinstance(x, str) else repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(lo: int, hi: int) -> Check:
    def check(x: Any, where: str) -> None:
        if type(x) is not int:  # bool is an int subclass; 1.0 and "8" are not ints here
            raise _Invalid(where, f"must be an integer in {lo}..{hi}, got {_show(x)}")
        if not lo <= x <= hi:
            raise _Invalid(where, f"{x} is out of bounds {lo}..{hi}")
    return check


def _float(lo: float, hi: float) -> Check:
    def check(x: Any, where: str) -> None:
        if type(x) not in (int, float) or not math.isfinite(x):
            raise _Invalid(where, f"must be a finite number in {lo:g}..{hi:g}, got {_show(x)}")
        if not lo <= x <= hi:
            raise _Invalid(where, f"{x:g} is out of bounds {lo:g}..{hi:g}")
    return check


def _str(max_len: int = 200, choices: tuple[str, ...] | None = None,
         pattern: str | None = None) -> Check:
    def check(x: Any, where: str) -> None:
        if not isinstance(x, str):
            raise _Invalid(where, f"must be a string, got {_show(x)}")
        if len(x) > max_len:
            raise _Invalid(where, f"string longer than {max_len} characters")
        if choices is not None and x not in choices:
            raise _Invalid(where, f"{_show(x)} is not one of {', '.join(choices)}")
        if pattern is not None and not re.fullmatch(pattern, x):
            raise _Invalid(where, f"{_show(x)} does not match {pattern}")
    return check


def _bool(x: Any, where: str) -> None:
    if not isinstance(x, bool):
        raise _Invalid(where, f"must be true or false, got {_show(x)}")


def _any_of(*checks: Check) -> Check:
    def check(x: Any, where: str) -> None:
        errors = []
        for c in checks:
            try:
                c(x, where)
                return
            except _Invalid as exc:
                errors.append(str(exc))
        raise _Invalid("", errors[0])
    return check


def _list(item: Check, min_len: int, max_len: int) -> Check:
    def check(x: Any, where: str) -> None:
        if not isinstance(x, list):
            raise _Invalid(where, f"must be a list, got {_show(x)}")
        if not min_len <= len(x) <= max_len:
            raise _Invalid(where, f"needs {min_len}..{max_len} items, has {len(x)}")
        for i, v in enumerate(x):
            item(v, f"{where}[{i}]")
    return check


def _mapping(key: Check, value: Check, max_len: int) -> Check:
    def check(x: Any, where: str) -> None:
        if not isinstance(x, dict):
            raise _Invalid(where, f"must be an object, got {_show(x)}")
        if len(x) > max_len:
            raise _Invalid(where, f"more than {max_len} entries")
        for k, v in x.items():
            key(k, f"{where} key")
            value(v, f"{where}.{k}")
    return check


def _object(fields: dict[str, Check], required: tuple[str, ...] = ()) -> Check:
    """A JSON object with only the keys of ``fields`` (each checked) and all of ``required``."""
    def check(x: Any, where: str) -> None:
        if not isinstance(x, dict):
            raise _Invalid(where, f"must be an object, got {_show(x)}")
        unknown = sorted(set(x) - set(fields))
        if unknown:
            raise _Invalid(where, f"unknown key {_show(unknown[0])} "
                                  f"(known: {', '.join(sorted(fields))})")
        for k in required:
            if k not in x:
                raise _Invalid(where, f"missing key {k!r}")
        for k, v in x.items():
            fields[k](v, f"{where}.{k}" if where else k)
    check.fields = tuple(fields)  # type: ignore[attr-defined]  # for the schema tests
    check.fields_map = dict(fields)  # type: ignore[attr-defined]
    return check


def _free(x: Any, where: str) -> None:
    """Free-form metadata (training, metrics ...): any JSON object; bounded by the card size."""
    if not isinstance(x, dict):
        raise _Invalid(where, f"must be an object, got {_show(x)}")


_CHANNELS = _int(1, 1024)
_SIZE = _int(16, 1024)
_SCALAR = _any_of(_str(1000), _float(-1e12, 1e12), _bool)

UNET_SCHEMA = _object({
    "arch": _str(choices=("monai-unet", "flexible-unet")),
    "image_size": _SIZE,
    "channels": _list(_CHANNELS, 2, 8),
    "num_res_units": _int(0, 8),
    "backbone": _str(32, pattern=r"(resnet(10|18|34|50|101|152|200)|efficientnet-b[0-8])"),
    "decoder_channels": _list(_CHANNELS, 1, 8),
    "feature_channels": _CHANNELS,
    "num_classes": _int(1, 64),
    "proj_hidden": _CHANNELS,
    "proj_dim": _CHANNELS,
    "extra": _mapping(_str(64), _SCALAR, 16),
})
HVAE_SCHEMA = _object({
    "image_size": _SIZE,
    "work_size": _int(4, 1024),
    "widths": _list(_CHANNELS, 1, 10),
    "blocks": _list(_int(0, 16), 1, 10),
    "latents": _mapping(_str(4, pattern=r"[1-9][0-9]{0,3}"), _int(1, 256), 10),
    "parent_dim": _int(1, 64),
    "embed_dim": _CHANNELS,
    "bottleneck": _int(1, 64),
    "sigma": _float(1e-6, 10.0),
    "bins": _int(2, 65536),
    "beta": _float(0.0, 1000.0),
    "top_beta": _float(0.0, 1000.0),
    "top_res": _int(1, 1024),
    "free_bits": _float(0.0, 1000.0),
    "cf_latents": _str(choices=("prior-relative", "posterior")),
    "fluid_dim": _int(0, 256),
    "fluid_beta": _float(0.0, 1000.0),
    "fluid_mode": _str(16, choices=("embed", "head")),
    "fluid_free_bits": _float(0.0, 100.0),
    "fluid_bank": _int(0, 4096),
    "fluid_enc": _str(16, choices=("pooled", "spatial")),
    "fluid_aux": _float(0.0, 1000.0),
    "fluid_coords": _bool,
    "fluid_head": _str(16, choices=("local", "multiscale")),
    "fluid_coarse": _int(0, 1024),
    "fluid_remap": _int(0, 1024),
})
CLASSIFIER_SCHEMA = _object({
    "image_size": _SIZE,
    "input_size": _SIZE,
    "widths": _list(_CHANNELS, 1, 10),
    "attributes": _list(_str(32, pattern=r"[a-z][a-z0-9_]*"), 1, 16),
})
# Bounds of a config field that has none above, by its annotated type: a field added to a
# network config later is bounded (and its bundles load) without editing this module.
GENERIC_BOUNDS: dict[str, Check] = {
    "int": _int(-1024, 1024),
    "float": _float(-1e6, 1e6),
    "str": _str(64),
    "bool": _bool,
    "tuple[int, ...]": _list(_int(0, 1024), 0, 16),
    "tuple[str, ...]": _list(_str(64), 0, 16),
}
# Architecture -> (key of the config in the component config, "module:ConfigClass",
# explicit bounds). The keys allowed are the fields of the config dataclass.
CONFIG_CLASSES: dict[str, tuple[str, str, Check]] = {
    "dense-unet": ("unet", "pcl_viewer.models.unet:UNetConfig", UNET_SCHEMA),
    "hvae": ("hvae", "pcl_viewer.models.hvae:HVAEConfig", HVAE_SCHEMA),
    "attribute-classifier": ("classifier", "pcl_viewer.models.classifiers:ClassifierConfig",
                             CLASSIFIER_SCHEMA),
}
_EXTRA_FIELDS = {"dense-unet": {"heads": _list(_str(choices=("seg", "proj", "global")), 1, 3)}}
# Architecture -> schema of its component config, for architectures registered with one.
# An architecture with neither is refused: its config would reach a builder unchecked.
CONFIG_SCHEMAS: dict[str, Check] = {}


def config_fields(arch: str) -> dict[str, Check]:
    """Checker of every field of ``arch``'s config dataclass: its explicit bounds, else the
    generic bounds of its annotated type. A field of another type raises BundleError."""
    import dataclasses

    key, target, explicit = CONFIG_CLASSES[arch]
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    checks: dict[str, Check] = {}
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        check = explicit.fields_map.get(f.name) or GENERIC_BOUNDS.get(kind)  # type: ignore[attr-defined]
        if check is None:
            raise BundleError(f"{target} field {f.name!r} ({kind}) has no bounds in "
                              "pcl_viewer/models/bundle.py; add them there")
        checks[f.name] = check
    return checks


def _config_schema(arch: str) -> Check:
    if arch in CONFIG_SCHEMAS:
        return CONFIG_SCHEMAS[arch]
    key = CONFIG_CLASSES[arch][0]
    return _object({key: _object(config_fields(arch)), **_EXTRA_FIELDS.get(arch, {})},
                   required=(key,))


def _file_name(x: Any, where: str) -> None:
    """A plain file name inside the bundle folder: relative, no folder, no ``..``."""
    _str(255)(x, where)
    if (PurePosixPath(x).is_absolute() or PureWindowsPath(x).is_absolute()
            or PureWindowsPath(x).drive):
        raise _Invalid(where, f"{_show(x)} is an absolute path; a bundle names its own files only")
    if "/" in x or "\\" in x or x in (".", ".."):
        raise _Invalid(where, f"{_show(x)} is not a file name inside the bundle folder")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors", x):
        raise _Invalid(where, f"{_show(x)} is not a .safetensors file name")


def _component(x: Any, where: str) -> None:
    _object({"architecture": _str(64), "config": _free, "file": _file_name,
             "sha256": _str(64, pattern=r"[0-9a-f]{64}")},
            required=("architecture", "config", "file", "sha256"))(x, where)
    arch = x["architecture"]
    if arch not in ARCHITECTURES:
        raise _Invalid(f"{where}.architecture", f"unknown architecture {arch!r}; "
                                                f"known: {', '.join(sorted(ARCHITECTURES))}")
    if arch not in CONFIG_SCHEMAS and arch not in CONFIG_CLASSES:
        raise _Invalid(f"{where}.architecture", f"architecture {arch!r} has no config schema "
                                                "(register_architecture(..., schema=...))")
    _config_schema(arch)(x["config"], f"{where}.config")


CARD_SCHEMA = _object({
    "format": _str(32, choices=(FORMAT,)),
    "name": _str(200),
    "version": _any_of(_str(64), _int(0, 10**9)),
    "kind": _str(64, pattern=r"[a-z][a-z0-9-]*"),
    "description": _str(20_000),
    "preset": _str(64),
    "method": _str(64),
    "dagger": _bool,
    "views": _str(64),
    "parents": _free,
    "input": _object({"size": _SIZE, "channels": _int(1, 4), "intensity": _str(200)}),
    "counterfactual": _free,
    "training": _free,
    "metrics": _free,
    "labels": _mapping(_str(8, pattern=r"[0-9]+"), _str(200), 64),
    "components": _mapping(_str(64, pattern=r"[a-z][a-z0-9_-]*"), _component, 8),
}, required=("format", "components"))


def validate_card(card: Any, where: str | os.PathLike[str] = "card") -> None:
    """Check a parsed card against the schema; raises :class:`BundleError` (one line)."""
    if not isinstance(card, dict):
        raise BundleError(f"{where}: the card must be a JSON object, got {type(card).__name__}")
    if card.get("format") != FORMAT:
        raise BundleError(f"{where}: format {card.get('format')!r}, expected {FORMAT!r}")
    try:
        CARD_SCHEMA(card, "")
    except _Invalid as exc:
        raise BundleError(f"{where}: {exc}") from None
    if not card["components"]:
        raise BundleError(f"{where}: no components")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def read_card(card_path: Path) -> dict[str, Any]:
    """Parse ``card.json`` (at most 1 MiB, no duplicate keys) and validate it."""
    try:
        size = card_path.stat().st_size
        if size > MAX_CARD_BYTES:
            raise BundleError(f"{card_path}: {size} bytes; a card holds at most {MAX_CARD_BYTES}")
        raw = card_path.read_bytes()
        card = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except BundleError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{card_path}: not valid JSON ({type(exc).__name__}: "
                          f"{str(exc)[:120]})") from None
    except OSError as exc:
        raise BundleError(f"{card_path}: cannot read ({exc.strerror or exc})") from None
    validate_card(card, card_path)
    return cast(dict[str, Any], card)


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Read and check the header of a safetensors file without reading its tensors.

    The first 8 bytes are the header length (little-endian u64); the header is JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``. Refused: a header length
    beyond the file or over 16 MiB (a pickle renamed .safetensors reads as a huge one),
    unknown dtypes, tensors whose byte range is outside the data, overlaps or gaps, and a
    byte count that is not ``prod(shape) * itemsize``.

    Returns:
        ``{tensor name: (dtype, shape)}``.
    """
    size = path.stat().st_size
    if size > MAX_WEIGHT_BYTES:
        raise BundleError(f"{path}: {size} bytes; weight files hold at most {MAX_WEIGHT_BYTES}")
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise BundleError(f"{path}: not a safetensors file (its header claims {n} bytes in "
                              f"a file of {size} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: safetensors header is not JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict) or len(header) > MAX_TENSORS + 1:
        raise BundleError(f"{path}: safetensors header is not an object of at most "
                          f"{MAX_TENSORS} tensors")
    data = size - 8 - n
    spans, out = [], {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(t, dict) and set(t) == {"dtype", "shape", "data_offsets"}
              and t["dtype"] in SAFETENSORS_DTYPES and isinstance(t["shape"], list)
              and len(t["shape"]) <= 8 and all(type(d) is int and 0 <= d <= 2**40 for d in t["shape"])
              and isinstance(t["data_offsets"], list) and len(t["data_offsets"]) == 2
              and all(type(o) is int for o in t["data_offsets"]))
        if not ok:
            raise BundleError(f"{path}: safetensors entry {name[:60]!r} is malformed")
        begin, end = t["data_offsets"]
        nbytes = math.prod(t["shape"]) * SAFETENSORS_DTYPES[t["dtype"]]
        if not 0 <= begin <= end <= data or end - begin != nbytes:
            raise BundleError(f"{path}: tensor {name[:60]!r} claims bytes {begin}..{end} "
                              f"({nbytes} needed) of {data} in the file")
        spans.append((begin, end))
        out[name] = (t["dtype"], tuple(t["shape"]))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise BundleError(f"{path}: tensors overlap or leave gaps in the data")
        pos = end
    if pos != data:
        raise BundleError(f"{path}: {data - pos} bytes after the last tensor")
    return out


# --------------------------------------------------------------------------- pins


def bundle_digest(card: dict[str, Any]) -> str:
    """sha256 over the card's content (canonical JSON: line endings and key order do not
    count) and, through it, every component's file name and weight sha256."""
    canonical = json.dumps(card, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(b"pcl-bundle-pin/1\n" + canonical.encode("utf-8")).hexdigest()


def load_pins() -> dict[str, dict[str, str]]:
    """``{bundle folder name: {"digest", "fingerprint"}}`` of the shipped bundles."""
    try:
        data = json.loads(PINS_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return dict(data.get("bundles", {}))


def _shipped_name(path: Path) -> str | None:
    """The folder name if ``path`` is a folder of the shipped models folder, else None."""
    from pcl_viewer.paths import models_dir

    try:
        root = models_dir().resolve()
    except OSError:
        return None
    real = path.resolve()
    return real.name if real.parent == root else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def register_architecture(name: str, target: str, schema: Check | None = None) -> None:
    """Register ``module:function`` as the builder of ``name``, with the checker of its
    component config (``schema(config, where)`` raising on a bad config; bundles of an
    architecture without one are refused)."""
    ARCHITECTURES[name] = target
    if schema is not None:
        CONFIG_SCHEMAS[name] = schema


def _builder(name: str, where: Path) -> Callable[[dict[str, Any]], nn.Module]:
    if name not in ARCHITECTURES:
        raise BundleError(
            f"{where}: unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    module, func = ARCHITECTURES[name].split(":")
    builder: Callable[[dict[str, Any]], nn.Module] = getattr(importlib.import_module(module), func)
    return builder


@dataclass
class ModelBundle:
    """A verified bundle on disk. Build networks with :meth:`build`.

    Attributes:
        path: the bundle folder.
        card: the validated card.
        verified: True for a shipped bundle that matches its pin; False for any other.
        digest: sha256 over the card and the weights (what a pin records).
    """

    path: Path
    card: dict[str, Any] = field(repr=False)
    verified: bool = False
    digest: str = ""
    _headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = field(
        default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.name))

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return cast(dict[str, dict[str, Any]], self.card["components"])

    @property
    def fingerprint(self) -> str:
        """Short hash over the weight hashes: identifies the exact weights in layer metadata."""
        joined = "".join(c["sha256"] for _, c in sorted(self.components.items()))
        return hashlib.sha256(joined.encode()).hexdigest()[:12]

    @property
    def notice(self) -> str | None:
        """One line to show beside an unverified bundle (None for a verified shipped one)."""
        if self.verified:
            return None
        return (f"unverified bundle {self.name!r} (fingerprint {self.fingerprint}, {self.path}): "
                "not a shipped bundle; its weights run as given, use it only from a source "
                "you trust")

    @classmethod
    def load(cls, path: str | os.PathLike[str], kind: str | None = None, *,
             check_pin: bool = True) -> ModelBundle:
        """Open and verify a bundle folder (schema, no pickles, headers, sha256s, pins).

        ``check_pin=False`` skips the pin of a shipped bundle (for the writer that has
        just replaced one, before re-pinning).
        """
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: not a bundle folder (expected a folder with {CARD})")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise BundleError(
                f"{path}: refusing a bundle that contains pickle-capable files {pickles}; "
                "bundles hold safetensors only"
            )
        card_path = path / CARD
        if not card_path.is_file():
            raise BundleError(f"{path}: missing {CARD}")
        card = read_card(card_path)
        if kind is not None and card.get("kind") != kind:
            raise BundleError(f"{path}: a {card.get('kind')!r} bundle, expected {kind!r}")
        root = path.resolve()
        headers = {}
        for cname, comp in card["components"].items():
            fpath = path / comp["file"]
            if not fpath.is_file():
                raise BundleError(f"{path}: component {cname!r} file {comp['file']!r} missing")
            if fpath.resolve().parent != root:
                raise BundleError(f"{path}: component {cname!r} file {comp['file']!r} links "
                                  "outside the bundle folder")
            headers[cname] = safetensors_header(fpath)
            digest = sha256_file(fpath)
            if digest != comp["sha256"]:
                raise BundleError(
                    f"{fpath}: sha256 {digest[:16]}... does not match the card "
                    f"({comp['sha256'][:16]}...); the weights were changed or corrupted"
                )
        bundle = cls(path=path, card=card, digest=bundle_digest(card), _headers=headers)
        shipped = _shipped_name(path)
        pin = load_pins().get(shipped) if shipped else None
        if pin is not None and check_pin:
            if pin.get("digest") != bundle.digest:
                raise BundleError(
                    f"{path}: shipped bundle {shipped!r} does not match its pin in "
                    f"pcl_viewer/models/shipped.json (pinned fingerprint {pin.get('fingerprint')}, "
                    f"found {bundle.fingerprint}, digest {bundle.digest[:16]}...): it was changed "
                    f"after it was pinned. If it was replaced on purpose, run: "
                    f"{PIN_COMMAND.format(name=shipped)}"
                )
            bundle.verified = True
        return bundle

    def state_dict(self, component: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        comp = self._component(component)
        return load_file(str(self.path / comp["file"]))

    def config(self, component: str) -> dict[str, Any]:
        return dict(self._component(component).get("config", {}))

    def build(self, component: str, device: str = "cpu") -> nn.Module:
        """Rebuild the network of ``component`` from its card config and load its weights.

        The network is first built on PyTorch's ``meta`` device (no memory): a config whose
        tensors differ in names or shapes from the weight file raises BundleError before
        anything is allocated, as do weights with missing or unexpected keys.
        """
        import torch

        comp = self._component(component)
        builder = _builder(comp["architecture"], self.path)
        config = comp.get("config", {})
        try:
            with torch.device("meta"):
                meta = builder(config)
        except Exception as exc:  # noqa: BLE001 - any builder failure is a bad config
            raise BundleError(f"{self.path}: config of {component!r} cannot be built: "
                              f"{type(exc).__name__}: {str(exc)[:160]}") from None
        want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        del meta
        have = {k: shape for k, (_, shape) in self._header(component).items()}
        if want != have:
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
            detail = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
                      if extra else f"{wrong[0]!r} is {have[wrong[0]]} in the file, "
                                    f"{want[wrong[0]]} in the config")
            raise BundleError(
                f"{self.path}: weights of {component!r} do not fit architecture "
                f"{comp['architecture']!r}: {len(missing)} missing, {len(extra)} unexpected, "
                f"{len(wrong)} of another shape ({detail})"
            )
        model = builder(config)
        state = self.state_dict(component)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise BundleError(
                f"{self.path}: weights of {component!r} do not fit architecture "
                f"{comp['architecture']!r}: {' '.join(first[:3])}"
            ) from exc
        return model.to(device).eval()

    def _header(self, component: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        if component not in self._headers:
            self._headers[component] = safetensors_header(
                self.path / self._component(component)["file"])
        return self._headers[component]

    def _component(self, component: str) -> dict[str, Any]:
        if component not in self.components:
            raise BundleError(
                f"{self.path}: no component {component!r} (has {', '.join(self.components)})"
            )
        return self.components[component]


def save_bundle(
    path: str | os.PathLike[str],
    card: dict[str, Any],
    components: dict[str, tuple[str, dict[str, Any], Any]],
) -> ModelBundle:
    """Write a bundle atomically (:func:`pcl_viewer.atomic.atomic_dir`).

    The new bundle is validated in its temporary folder before it replaces ``path``, so
    a card the loader would refuse never replaces a working bundle. Writing over a shipped
    bundle leaves it unverified until it is re-pinned (see the module docstring).

    Args:
        path: destination folder (replaced if it exists).
        card: card fields (name, version, kind, parents, input, training, metrics ...).
        components: ``{name: (architecture, config_dict, module_or_state_dict)}``.
    """
    from safetensors.torch import save_file

    from pcl_viewer.atomic import atomic_dir

    path = Path(path)
    with atomic_dir(path) as tmp:
        out = dict(card)
        out["format"] = FORMAT
        out["components"] = {}
        for cname, (arch, config, weights) in components.items():
            state = weights.state_dict() if hasattr(weights, "state_dict") else weights
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            fname = f"{cname}.safetensors"
            save_file(state, str(tmp / fname))
            out["components"][cname] = {
                "architecture": arch,
                "config": config,
                "file": fname,
                "sha256": sha256_file(tmp / fname),
            }
        (tmp / CARD).write_text(json.dumps(out, indent=2, sort_keys=False, default=str) + "\n")
        ModelBundle.load(tmp, check_pin=False)
    return ModelBundle.load(path, check_pin=False)


def find_bundle(name_or_path: str | os.PathLike[str]) -> Path:
    """Resolve a bundle given as a path, or a name under resources/models or the user dir."""
    from pcl_viewer.paths import models_dir, user_models_dir

    p = Path(name_or_path)
    if p.is_dir():
        return p
    for root in (models_dir(), user_models_dir()):
        if (root / str(name_or_path)).is_dir():
            return root / str(name_or_path)
    raise BundleError(f"no bundle {str(name_or_path)!r} (not a folder, not in {models_dir()})")


# --------------------------------------------------------------------------- pinning


def pin_bundle(path: str | os.PathLike[str]) -> dict[str, str]:
    """Record the digest of the shipped bundle at ``path`` in ``shipped.json`` (atomically).

    The bundle must pass every check but its pin. Returns the new pin.
    """
    from pcl_viewer.atomic import atomic_write_text

    path = Path(path)
    name = _shipped_name(path)
    if name is None:
        from pcl_viewer.paths import models_dir

        raise BundleError(f"{path}: only bundles in {models_dir()} are pinned")
    bundle = ModelBundle.load(path, check_pin=False)
    try:
        data = json.loads(PINS_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    data["format"] = "pcl-bundle-pins/1"
    data["command"] = PIN_COMMAND.format(name="NAME")
    pins = dict(data.get("bundles", {}))
    entry = {"digest": bundle.digest, "fingerprint": bundle.fingerprint}
    pins[name] = entry
    data["bundles"] = dict(sorted(pins.items()))
    atomic_write_text(PINS_FILE, json.dumps(data, indent=2) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    """``python -m pcl_viewer.models.bundle --pin resources/models/NAME [...]`` / ``--check``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pcl_viewer.models.bundle",
                                     description="Pin or check bundles.")
    parser.add_argument("--pin", nargs="+", metavar="BUNDLE",
                        help="record the digest of these shipped bundles in shipped.json")
    parser.add_argument("--check", nargs="+", metavar="BUNDLE",
                        help="load these bundles and print their fingerprint and status")
    args = parser.parse_args(argv)
    try:
        for p in args.pin or []:
            pin = pin_bundle(p)
            print(f"pinned {p}: fingerprint {pin['fingerprint']}, digest {pin['digest']}")
        for p in args.check or []:
            b = ModelBundle.load(find_bundle(p))
            print(f"{b.path}: fingerprint {b.fingerprint}, "
                  f"{'verified (pinned)' if b.verified else b.notice}")
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not (args.pin or args.check):
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
