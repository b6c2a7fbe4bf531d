"""Build and update the napari layers of pipeline results (runs in the Qt thread only).

Every layer this module makes has its scan layer's scale, carries the result's
provenance in ``metadata`` (bundles and fingerprints, parents, intervention,
strength, domain check) and is found again by ``(scan layer, view key, kind)`` so
a re-run updates it in place. In the compare layout (the default) each view sits
in its own tile beside the scan (translated by whole tiles); otherwise every view
lies on the scan. The user's own layers are never modified: a labels layer the user
has edited (painted, filled, erased) is left alone and a re-run writes a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np

from pcl_viewer.colors import LUNG_COLOURS
from pcl_viewer.data.scan import Scan
from pcl_viewer.pipeline import FACTUAL, PipelineResult, View

KINDS = ("image", "difference", "labels", "chromap", "linked")
# Short suffixes: napari's layer list elides the middle of long names, so the part
# that tells two layers apart sits at the end.
SUFFIX = {"image": "", "difference": " diff", "labels": " lungs", "chromap": " CHRO",
          "linked": " linked"}
LINKED_COLOUR = "#ff3cff"  # pixels of the selected CHRO-map feature
DIFF_LIMIT = 0.25
TILE_GAP = 0.04  # gap between compare tiles, as a fraction of the scan's larger side


def layer_key(layer) -> str:
    """A stable key of a layer. Not ``id()``: napari hands plugins proxies of its layers,
    and every access returns a new proxy object."""
    return str(layer.unique_id)


def is_derived(layer) -> bool:
    """True for layers this plugin created (not a scan)."""
    return bool(layer.metadata.get("pcl_viewer"))


def scan_from_layer(layer) -> Scan:
    """The scan shown by an image layer: grey float32 [0, 1] (min-max scaled if it is not)."""
    data = np.asarray(layer.data)
    if getattr(layer, "rgb", False):
        data = data[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if data.ndim != 2:
        raise ValueError(f"layer {layer.name!r}: expected a 2-D image, got shape {data.shape}")
    img = data.astype(np.float32, copy=False)
    lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
    if lo < 0.0 or hi > 1.0:
        img = (img - lo) / max(hi - lo, 1e-12)
    img = np.nan_to_num(img, nan=0.0)
    info = layer.metadata.get("pcl_scan") or {}
    spacing = tuple(float(s) for s in layer.scale[-2:])
    return Scan(img, spacing=spacing, name=layer.name, path=info.get("path"),
                metadata={"layer": layer.name})


def layer_name(scan: str, view: View, kind: str) -> str:
    """Short, distinct names: ``chest: scan lungs``, ``chest: scanner``, ``chest: effusion
    x0.5 CHRO`` (the full intervention, e.g. ``do(scanner=philips)``, is in the metadata)."""
    tag = "scan" if view.key == FACTUAL else view.key
    if view.key != FACTUAL and abs(view.strength - 1.0) > 1e-9:
        tag += f" x{view.strength:g}"
    suffix = SUFFIX[kind]
    if view.key == FACTUAL and kind == "image":
        return scan
    return f"{scan}: {(tag + suffix).strip()}"


def tile_offset(scan_layer, index: int, n_views: int) -> tuple[float, float]:
    """World offset (row, column) of tile ``index`` of ``n_views`` in the compare layout:
    a near-square grid (2 x 2 for four views), row-major, tile 0 the scan itself."""
    h, w = np.asarray(scan_layer.data.shape[-2:], np.float64) * np.abs(scan_layer.scale[-2:])
    cols = max(1, math.ceil(math.sqrt(n_views)))
    gap = TILE_GAP * max(h, w)
    return (index // cols) * (h + gap), (index % cols) * (w + gap)


def _digest(data: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=16).hexdigest()


class LayerBuilder:
    """Adds or updates the layers of one viewer."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self._layers: dict[tuple[str, str, str], Any] = {}
        self._digests: dict[str, str] = {}  # labels layer key -> digest of the data we set
        self.compare = True  # compare layout: one tile per view
        self._suffix: dict[tuple[str, str, str], str] = {}  # " (new)" after a kept edit
        self.tiles = 0  # tiles planned for the run (views to come); at least the views shown

    def snapshot(self, scan_layer) -> dict[tuple[str, str, str], Any]:
        """The layers of ``scan_layer`` now, for :meth:`rollback`."""
        uid = layer_key(scan_layer)
        return {k: ly for k, ly in self._layers.items() if k[0] == uid and self._alive(ly)}

    def rollback(self, scan_layer, before: dict[tuple[str, str, str], Any],
                 result: PipelineResult | None, difference: bool = False) -> None:
        """Undo an unfinished run: remove the layers it added for ``scan_layer`` and give the
        others the data of ``result`` (the scan's last finished result) again."""
        uid = layer_key(scan_layer)
        for key, layer in list(self._layers.items()):
            if key[0] != uid or (key in before and layer_key(before[key]) == layer_key(layer)):
                continue
            self._layers.pop(key)
            if self._alive(layer):
                self.viewer.layers.remove(layer)
        self._layers.update({k: ly for k, ly in before.items() if self._alive(ly)})
        if result is not None:
            for view in result.views.values():
                labels = self.get(scan_layer, view.key, "labels")
                if labels is not None and self.edited(labels):  # the user's edit stays
                    view = dataclasses.replace(view, labels=None)
                self.show_view(scan_layer, result, view, difference=difference,
                               chromap_visible=None)

    def edited(self, layer) -> bool:
        """True when a labels layer's data is no longer what this builder last put there
        (painted, filled or erased by the user, or changed by another plugin)."""
        digest = self._digests.get(layer_key(layer))
        return digest is not None and digest != _digest(np.asarray(layer.data))

    def offset(self, scan_layer, result: PipelineResult, key: str) -> tuple[float, ...]:
        """The translate of ``key``'s layers: the scan's, plus the tile offset when comparing."""
        base = tuple(float(t) for t in scan_layer.translate)
        if not self.compare:
            return base
        keys = list(result.views)
        idx = keys.index(key) if key in keys else 0
        dy, dx = tile_offset(scan_layer, idx, max(len(keys), self.tiles))
        return (*base[:-2], base[-2] + dy, base[-1] + dx)

    def set_compare(self, scan_layer, result: PipelineResult | None, on: bool) -> None:
        """Switch the compare layout on or off for the layers of ``scan_layer``."""
        self.compare = on
        if result is None:
            return
        for key in result.views:
            t = self.offset(scan_layer, result, key)
            for kind in KINDS:
                layer = self.get(scan_layer, key, kind)
                if layer is not None and tuple(layer.translate) != t:
                    layer.translate = t

    def _alive(self, layer) -> bool:
        return layer is not None and layer_key(layer) in {layer_key(ly) for ly in self.viewer.layers}

    def layers_of(self, scan_layer) -> list:
        """Live layers built for ``scan_layer`` (creation order)."""
        uid = layer_key(scan_layer)
        return [ly for (u, _, _), ly in self._layers.items() if u == uid and self._alive(ly)]

    def get(self, scan_layer, key: str, kind: str):
        layer = self._layers.get((layer_key(scan_layer), key, kind))
        return layer if self._alive(layer) else None

    def show_view(self, scan_layer, result: PipelineResult, view: View,
                  difference: bool = False, chromap_visible: bool | None = None) -> list:
        """Create/update every layer ``view`` has data for; returns the layers touched."""
        touched = []
        if view.key != FACTUAL:
            touched.append(self._put(scan_layer, result, view, "image", view.image))
            if difference:
                diff = view.image - result.scan.image
                touched.append(self._put(scan_layer, result, view, "difference", diff))
        if view.labels is not None:
            touched.append(self._put(scan_layer, result, view, "labels", view.labels))
        if view.overlay is not None:  # visible None: as it is (new layers: hidden)
            touched.append(self._put(scan_layer, result, view, "chromap", view.overlay,
                                     visible=chromap_visible))
        return touched

    def show_captions(self, scan_layer, result: PipelineResult) -> Any:
        """Each tile's view name in the canvas, above its top-left corner (compare layout
        only; hidden otherwise). One Points layer per scan, updated in place."""
        keys = list(result.views)
        pos = np.array([self.offset(scan_layer, result, k)[-2:] for k in keys], np.float64)
        pos[:, 0] -= 0.01 * scan_layer.data.shape[-2] * abs(scan_layer.scale[-2])
        text = [("scan" if k == FACTUAL else result.views[k].name) for k in keys]
        key = (layer_key(scan_layer), "*", "captions")
        layer = self._layers.get(key)
        if layer is not None and self._alive(layer):
            if not np.array_equal(layer.data, pos) or list(layer.features["caption"]) != text:
                layer.data = pos
                layer.features = {"caption": text}
            if layer.visible != self.compare:
                layer.visible = self.compare
            return layer
        layer = self.viewer.add_points(
            pos, name=f"{scan_layer.name}: captions", size=0, features={"caption": text},
            text={"string": "{caption}", "anchor": "lower_left", "color": "white", "size": 11},
            metadata={"pcl_viewer": True, "kind": "captions", "scan_layer": scan_layer.name},
            visible=self.compare)
        self._layers[key] = layer
        return layer

    def remove_kind(self, scan_layer, kind: str) -> None:
        """Remove this builder's ``kind`` layers of ``scan_layer`` (e.g. stale "linked")."""
        uid = layer_key(scan_layer)
        for key, layer in list(self._layers.items()):
            if key[0] == uid and key[2] == kind:
                self._layers.pop(key)
                if self._alive(layer):
                    self.viewer.layers.remove(layer)

    def show_linked(self, scan_layer, result: PipelineResult, masks: dict[str, np.ndarray]) -> list:
        """One "linked" labels layer per view: ``masks`` ``{view key: (H, W) bool}``."""
        return [self._put(scan_layer, result, result.views[k], "linked", m.astype(np.uint8))
                for k, m in masks.items()]

    def _put(self, scan_layer, result: PipelineResult, view: View, kind: str, data: np.ndarray,
             visible: bool | None = None):
        meta = {**result.metadata(view.key), "kind": kind, "scan_layer": scan_layer.name}
        key = (layer_key(scan_layer), view.key, kind)
        name = layer_name(scan_layer.name, view, kind) + self._suffix.get(key, "")
        layer = self.get(scan_layer, view.key, kind)
        translate = self.offset(scan_layer, result, view.key)
        if layer is not None and kind == "labels" and self.edited(layer):
            # The user's edit stays as it is (with its undo history); a new layer takes
            # the new labels.
            self._layers.pop(key)
            self._digests.pop(layer_key(layer), None)
            layer = None
            self._suffix[key] = self._suffix.get(key, "") + " (new)"
            name += " (new)"
        if layer is not None:
            # Each setter refreshes the layer (thumbnail, texture upload, canvas redraw) in
            # the Qt thread, even for an unchanged value: touch only what changed. A view
            # comes back after its labels and again after its CHRO-map with the same arrays.
            if layer.data is not data:
                layer.data = data
                if kind == "labels":
                    self._digests[layer_key(layer)] = _digest(data)
            if layer.metadata != meta:
                layer.metadata = meta
            if layer.name != name:
                layer.name = name
            if visible is not None and layer.visible != visible:
                layer.visible = visible
            if tuple(layer.translate) != translate:
                layer.translate = translate
            return layer
        common = {"name": name, "metadata": meta, "scale": tuple(scan_layer.scale),
                  "translate": translate}
        if kind == "labels":
            from napari.utils.colormaps import CyclicLabelColormap

            # A cyclic map keeps uint8 labels a plain texture lookup (a direct map costs a
            # numba compile on first use: seconds).
            cmap = CyclicLabelColormap(colors=list(LUNG_COLOURS), background_value=0)
            layer = self.viewer.add_labels(data, opacity=0.45, colormap=cmap, **common)
            self._digests[layer_key(layer)] = _digest(data)
        elif kind == "linked":
            from napari.utils.colormaps import CyclicLabelColormap

            cmap = CyclicLabelColormap(colors=["transparent", LINKED_COLOUR],
                                       background_value=0)
            layer = self.viewer.add_labels(data, opacity=0.8, colormap=cmap, **common)
        elif kind == "chromap":
            # hidden until asked for: it would cover the labels of its view
            layer = self.viewer.add_image(data, rgb=True, blending="translucent",
                                          visible=bool(visible), **common)
        elif kind == "difference":
            layer = self.viewer.add_image(data, colormap="PiYG",
                                          contrast_limits=(-DIFF_LIMIT, DIFF_LIMIT), **common)
        else:
            layer = self.viewer.add_image(data, colormap="gray", contrast_limits=(0.0, 1.0),
                                          **common)
        self._layers[key] = layer
        return layer


def prewarm_labels() -> None:
    """Build one throwaway Labels model while the user looks at the window: the first one
    in a process pays seconds of imports and set-up, which would otherwise freeze the
    window in the middle of the first segmentation."""
    from napari.layers import Labels
    from napari.utils.colormaps import CyclicLabelColormap

    Labels(np.zeros((2, 2), np.uint8),
           colormap=CyclicLabelColormap(colors=list(LUNG_COLOURS), background_value=0))
