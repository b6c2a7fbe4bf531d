"""napari plugin of pcl-viewer: counterfactual chest X-rays, lung segmentation, CHRO-maps.

Contributions are declared in ``napari.yaml`` (npe2); the launcher is
``pcl-viewer`` (:mod:`pcl_viewer_napari.launcher`). Importing this package
imports neither torch nor Qt.
"""

__all__ = ["WIDGET_NAME"]

WIDGET_NAME = "Counterfactuals & CHRO-map"
