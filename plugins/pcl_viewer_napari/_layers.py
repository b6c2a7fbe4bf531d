"""Build and update the napari layers of pipeline results (runs in the Qt thread only).

Every layer this module makes is aligned with its scan layer (same scale and
translate), carries the result's provenance in ``metadata`` (bundles and
fingerprints, parents, intervention, strength) and is found again by
``(scan layer, view key, kind)`` so a re-run updates it in place. The user's
own layers are never modified.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pcl_viewer.data.scan import Scan
from pcl_viewer.pipeline import FACTUAL, PipelineResult, View

KINDS = ("image", "difference", "labels", "chromap")
# index = label value: background, right lung, left lung. A cyclic map keeps uint8 labels
# a plain texture lookup (a direct map costs a numba compile on first use: seconds).
LUNG_COLOURS = ["transparent", "#1f9bff", "#ffb000"]
DIFF_LIMIT = 0.25


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
    base = scan if view.key == FACTUAL else f"{scan} [{view.name}]"
    suffix = {"image": "", "difference": " difference", "labels": " lungs",
              "chromap": " CHRO-map"}[kind]
    return base + suffix


def finished_part(view: View, stage: str) -> View:
    """What of ``view`` the step of ``stage`` finished. The worker keeps filling the same
    View while its earlier steps wait in the Qt thread's queue: show only this part."""
    if stage == "decode" or (stage == "parents" and view.key == FACTUAL):
        return View(view.key, view.do, view.strength, view.parents, view.image, view.residual)
    if stage == "segment":
        return View(view.key, view.do, view.strength, view.parents, view.image, view.residual,
                    labels=view.labels)
    return view


class LayerBuilder:
    """Adds or updates the layers of one viewer."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self._layers: dict[tuple[str, str, str], Any] = {}

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
        if view.overlay is not None:
            visible = view.key == FACTUAL if chromap_visible is None else chromap_visible
            touched.append(self._put(scan_layer, result, view, "chromap", view.overlay,
                                     visible=visible))
        return touched


    def _put(self, scan_layer, result: PipelineResult, view: View, kind: str, data: np.ndarray,
             visible: bool | None = None):
        meta = {**result.metadata(view.key), "kind": kind, "scan_layer": scan_layer.name}
        name = layer_name(scan_layer.name, view, kind)
        key = (layer_key(scan_layer), view.key, kind)
        layer = self.get(scan_layer, view.key, kind)
        if layer is not None:
            # Each setter refreshes the layer (thumbnail, texture upload, canvas redraw) in
            # the Qt thread, even for an unchanged value: touch only what changed. A view
            # comes back after its labels and again after its CHRO-map with the same arrays.
            if layer.data is not data:
                layer.data = data
            if layer.metadata != meta:
                layer.metadata = meta
            if layer.name != name:
                layer.name = name
            if visible is not None and layer.visible != visible:
                layer.visible = visible
            return layer
        common = {"name": name, "metadata": meta, "scale": tuple(scan_layer.scale),
                  "translate": tuple(scan_layer.translate)}
        if kind == "labels":
            from napari.utils.colormaps import CyclicLabelColormap

            cmap = CyclicLabelColormap(colors=LUNG_COLOURS, background_value=0)
            layer = self.viewer.add_labels(data, opacity=0.45, colormap=cmap, **common)
        elif kind == "chromap":
            layer = self.viewer.add_image(data, rgb=True, blending="translucent",
                                          visible=True if visible is None else visible, **common)
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
           colormap=CyclicLabelColormap(colors=LUNG_COLOURS, background_value=0))
