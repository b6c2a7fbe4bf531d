"""Menu commands and docking: Layers > Segment > Segment lungs, and the widget's dock."""

from __future__ import annotations

import napari

from pcl_viewer_napari._widget import WIDGET_NAME, PCLViewerWidget


def segment_lungs(viewer: napari.viewer.Viewer) -> None:
    """Layers > Segment > Segment lungs: segment the selected scan layer with the dock widget."""
    widget = dock_widget(viewer)
    active = viewer.layers.selection.active
    if active is not None:
        widget.select_scan(active)
    widget.run("segment", interventions=())


def new_viewer_with_widget(bundle: str | None = None, seg_bundle: str | None = None,
                           device: str | None = None
                           ) -> tuple[napari.viewer.Viewer, PCLViewerWidget]:
    """A new napari viewer with the PCL widget docked and its model/device choices set
    (None keeps the widget's default)."""
    import napari

    viewer = napari.Viewer(title="pcl-viewer")
    widget = dock_widget(viewer)
    if bundle:
        widget.model_panel.cf_combo.setCurrentText(bundle)
    if seg_bundle:
        widget.model_panel.seg_combo.setCurrentText(seg_bundle)
    if device:
        widget.model_panel.device_combo.setCurrentText(device)
    return viewer, widget


def dock_widget(viewer: napari.viewer.Viewer) -> PCLViewerWidget:
    """The viewer's PCL widget, docked on the right (created once)."""
    for dock in getattr(viewer.window, "dock_widgets", {}).values():
        inner = dock.widget() if hasattr(dock, "widget") else dock
        if isinstance(inner, PCLViewerWidget):
            return inner
    try:
        _, widget = viewer.window.add_plugin_dock_widget("pcl-viewer", WIDGET_NAME)
        if isinstance(widget, PCLViewerWidget):
            return widget
    except Exception:  # plugin not registered (e.g. running from a source tree)
        pass
    widget = PCLViewerWidget(viewer)
    viewer.window.add_dock_widget(widget, name=WIDGET_NAME, area="right")
    return widget
