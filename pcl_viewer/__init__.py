"""pcl-viewer: pixel-level counterfactual contrastive learning for chest X-rays.

The core package never imports Qt or napari; torch is imported lazily by the
modules that need it so that ``pcl --help`` stays fast.
"""

__version__ = "0.1.0"
