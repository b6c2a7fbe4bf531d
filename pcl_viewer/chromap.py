"""CHRO-map: colour-coded high-resolution overlay of dense U-Net features.

docs/method.md §6. For the decoder features of one scan's views (the real
image and its counterfactuals), all views share one colour frame:

1. L2-normalise each pixel's ``C``-channel feature vector;
2. z-score each channel over the pooled pixels of all views;
3. reduce to 2-D (``pca``: eigenvectors of the ``C x C`` covariance, the fast
   interactive default; ``umap``: umap-learn, the reference, fitted on a
   seeded subsample and applied to every pixel);
4. fit the minimum-volume enclosing ellipse (Khachiyan), scaled so that every
   point lies inside and the farthest on the boundary, and map each point to
   the unit disc, ``u = A^(1/2) (x - c)``;
5. colour in polar HSV: hue = angle of ``u``, saturation = ``|u|``, value = 1;
6. upsample per view to the native scan (nearest) and blend with the grey scan.

The fitted :class:`ChroMapFrame` (z-score statistics, reducer, ellipse) is
kept, so a new counterfactual of the same scan is coloured in the same frame
without refitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from pcl_viewer.data.preprocess import Geometry

REDUCERS: tuple[str, ...] = ("pca", "umap")
MODES: tuple[str, ...] = ("blend", "aggregated")
# UMAP is fitted on at most this many pixels (seeded subsample), then applied to all.
UMAP_FIT_PIXELS = 4000
# umap-learn's own default for more than 10,000 points (the reference's case); it
# would use 500 for our subsample.
UMAP_EPOCHS = 200
_EPS = 1e-12


# ---------------------------------------------------------------- ellipse ---


@dataclass(frozen=True)
class Ellipse:
    """The ellipse ``{x : (x - c)^T A (x - c) <= 1}`` in the 2-D reducer plane.

    Attributes:
        centre: ``(2,)`` float64 ``c``.
        matrix: ``(2, 2)`` float64 symmetric positive-definite ``A``.
    """

    centre: np.ndarray
    matrix: np.ndarray

    def mahalanobis(self, points: np.ndarray) -> np.ndarray:
        """``(N, 2)`` -> ``(N,)`` values of ``(x - c)^T A (x - c)`` (<= 1 inside)."""
        d = np.asarray(points, dtype=np.float64) - self.centre
        return np.einsum("ni,ij,nj->n", d, self.matrix, d)

    def sqrt_matrix(self) -> np.ndarray:
        """``A^(1/2)`` (symmetric square root), ``(2, 2)``."""
        w, v = np.linalg.eigh(self.matrix)
        return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    def to_disc(self, points: np.ndarray) -> np.ndarray:
        """``(N, 2)`` plane points -> ``(N, 2)`` float32 unit-disc coordinates ``A^(1/2)(x - c)``."""
        d = np.asarray(points, dtype=np.float64) - self.centre
        return (d @ self.sqrt_matrix().T).astype(np.float32)

    def outline(self, n: int = 256) -> np.ndarray:
        """``(n, 2)`` points on the boundary, for plotting."""
        t = np.linspace(0.0, 2.0 * np.pi, n)
        circle = np.stack([np.cos(t), np.sin(t)], axis=1)
        return circle @ np.linalg.inv(self.sqrt_matrix()).T + self.centre


def khachiyan_mvee(points: np.ndarray, tol: float = 1e-5, max_iter: int = 1000) -> Ellipse:
    """Minimum-volume enclosing ellipse of ``(N, 2)`` points (Khachiyan's algorithm).

    The ellipse of a set is the ellipse of its convex hull, so the iterations run
    on the hull vertices only (exact, and what keeps a 65k-pixel fit in
    milliseconds). The result is rescaled so the farthest point lies exactly on
    the boundary: every point is inside, whether or not the iterations converged.
    Degenerate clouds (one point, or all on a line) get the smallest enclosing
    circle about their mean.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise ValueError(f"expected (N, 2) points with N >= 1, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or inf")
    hull = _hull_vertices(pts)
    if hull is None:
        return _enclosing_circle(pts)
    d = 2
    q = np.vstack([hull.T, np.ones(len(hull))])  # (3, M) lifted points
    u = np.full(len(hull), 1.0 / len(hull))
    # X(u) = Q diag(u) Q^T changes by a rank-one step per iteration, so its inverse and
    # m = diag(Q^T X^-1 Q) are updated by Sherman-Morrison instead of re-solved.
    x_inv = np.linalg.inv((q * u) @ q.T)
    m = np.einsum("ij,ij->j", q, x_inv @ q)
    for _ in range(max_iter):
        j = int(np.argmax(m))
        mj = float(m[j])
        step = (mj - d - 1.0) / ((d + 1.0) * (mj - 1.0))
        change = step * np.sqrt(float(u @ u) - 2.0 * u[j] + 1.0)  # = |u_new - u|
        u *= 1.0 - step
        u[j] += step
        t = step / (1.0 - step)
        w = x_inv @ q[:, j]
        k = t / (1.0 + t * mj)
        m = (m - k * (w @ q) ** 2) / (1.0 - step)
        x_inv = (x_inv - k * np.outer(w, w)) / (1.0 - step)
        if change < tol:
            break
    centre = hull.T @ u
    cov = (hull.T * u) @ hull - np.outer(centre, centre)
    matrix = np.linalg.inv(cov) / d
    ellipse = Ellipse(centre, matrix)
    worst = float(ellipse.mahalanobis(pts).max())
    return Ellipse(centre, matrix / max(worst, _EPS))


def _hull_vertices(pts: np.ndarray) -> np.ndarray | None:
    """Convex-hull vertices ``(M, 2)``, or None when the cloud has no area."""
    from scipy.spatial import ConvexHull, QhullError

    uniq = np.unique(pts, axis=0) if len(pts) < 4096 else pts
    if len(uniq) < 3:
        return None
    centred = uniq - uniq.mean(axis=0)
    lo, hi = np.linalg.eigvalsh(centred.T @ centred)
    if lo <= 1e-12 * max(hi, _EPS):
        return None
    try:
        return uniq[ConvexHull(uniq).vertices]
    except QhullError:
        return None


def _enclosing_circle(pts: np.ndarray) -> Ellipse:
    centre = pts.mean(axis=0)
    radius = float(np.sqrt(((pts - centre) ** 2).sum(axis=1).max()))
    radius = radius if radius > 1e-12 else 1.0
    return Ellipse(centre, np.eye(2) / radius**2)


# ---------------------------------------------------------------- colours ---


def disc_hsv(disc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(..., 2)`` unit-disc coords -> hue in [0, 1) (angle / 2 pi) and saturation in [0, 1] (radius)."""
    hue = (np.arctan2(disc[..., 1], disc[..., 0]) / (2.0 * np.pi)) % 1.0
    sat = np.clip(np.hypot(disc[..., 0], disc[..., 1]), 0.0, 1.0)
    return hue.astype(np.float32), sat.astype(np.float32)


def hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, value: np.ndarray | float = 1.0) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs in [0, 1] of one shape ``S`` -> ``S + (3,)`` float32."""
    h6 = np.asarray(hue, dtype=np.float32) * 6.0
    sector = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    v = np.broadcast_to(np.asarray(value, dtype=np.float32), h6.shape)
    s = np.asarray(sat, dtype=np.float32)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ])
    return np.take_along_axis(table, sector[None, ..., None].repeat(3, -1), 0)[0]


def disc_colours(disc: np.ndarray) -> np.ndarray:
    """``(..., 2)`` unit-disc coords -> ``(..., 3)`` float32 RGB in [0, 1] (polar HSV, value 1)."""
    return hsv_to_rgb(*disc_hsv(disc))


# --------------------------------------------------------------- reducers ---


class Reducer(Protocol):
    def transform(self, z: np.ndarray) -> np.ndarray:
        """``(N, C)`` z-scored features -> ``(N, 2)`` plane coordinates."""


@dataclass(frozen=True)
class PCAReducer:
    """Projection on the two leading eigenvectors of the ``C x C`` covariance.

    Each component's sign is fixed (its largest-magnitude loading is positive),
    so the colours do not flip between runs or machines.
    """

    components: np.ndarray  # (C, 2)

    @classmethod
    def fit(cls, z: np.ndarray) -> PCAReducer:
        cov = (z.T @ z).astype(np.float64) / max(len(z) - 1, 1)
        w, v = np.linalg.eigh(cov)
        comps = v[:, np.argsort(w)[::-1][:2]]
        signs = np.sign(comps[np.abs(comps).argmax(axis=0), [0, 1]])
        return cls((comps * np.where(signs == 0, 1.0, signs)).astype(np.float32))

    def transform(self, z: np.ndarray) -> np.ndarray:
        return z @ self.components


def _import_umap(module: str = "umap"):
    """umap-learn's ``module`` (imported on first use: an optional dependency), or an
    ImportError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError("the UMAP reducer needs umap-learn: pip install 'pcl-viewer[umap]'") from exc


class UMAPReducer:
    """umap-learn fitted on a seeded subsample of pixels, extended to every pixel.

    Every pixel (the subsample included) is placed the way UMAP initialises a
    new point in ``transform``: the membership-weighted mean of the embeddings
    of its ``n_neighbors`` nearest fitted pixels (UMAP's ``smooth_knn_dist``
    weights). UMAP's per-point SGD refinement is skipped: on this CPU it costs
    ~10 ms per pixel (minutes for 65k pixels). Placement is a pure function of
    the feature vector, so identical features get identical colours in every view.
    """

    def __init__(self, model, neighbours) -> None:
        self.model = model
        self.neighbours = neighbours  # sklearn NearestNeighbors on the fitted z-scored pixels
        self.embedding = np.asarray(model.embedding_, dtype=np.float32)  # (n_fit, 2)

    @classmethod
    def fit(cls, z: np.ndarray, seed: int = 0, fit_pixels: int = UMAP_FIT_PIXELS) -> UMAPReducer:
        import warnings

        from sklearn.neighbors import NearestNeighbors

        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(z), size=min(fit_pixels, len(z)), replace=False))
        fitted = np.ascontiguousarray(z[pick], dtype=np.float32)
        k = min(15, len(fitted) - 1)
        # Exact neighbours by BLAS; umap-learn's own small-data path calls its numba
        # metric once per pair from Python (minutes for 4000 points).
        neighbours = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(fitted)
        dist, idx = neighbours.kneighbors(fitted)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seed disables parallelism; no search index
            umap = _import_umap()
            model = umap.UMAP(n_components=2, n_neighbors=k, min_dist=0.1, n_epochs=UMAP_EPOCHS,
                              random_state=seed,
                              precomputed_knn=(idx, dist.astype(np.float32), None))
            model.fit(fitted)
        return cls(model, neighbours)

    def transform(self, z: np.ndarray) -> np.ndarray:
        smooth_knn_dist = _import_umap("umap.umap_").smooth_knn_dist
        k = int(self.neighbours.n_neighbors)
        dist, idx = self.neighbours.kneighbors(np.asarray(z, dtype=np.float32))
        dist = dist.astype(np.float32)
        sigma, rho = smooth_knn_dist(dist, float(k), local_connectivity=0.0)
        weights = np.exp(-np.maximum(dist - rho[:, None], 0.0) / np.maximum(sigma[:, None], 1e-12))
        weights /= weights.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkd->nd", weights, self.embedding[idx]).astype(np.float32)


class FittedOnly:
    """The reference reducer's stand-in in a frame: UMAP on all pixels has no transform."""

    def transform(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError("the reference UMAP embeds only the pixels it was fitted on")


def reference_umap(z: np.ndarray, seed: int = 0) -> np.ndarray:
    """The reference reducer: UMAP fitted on *all* ``(N, C)`` pixels -> ``(N, 2)``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umap = _import_umap()
        model = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed)
        return np.asarray(model.fit_transform(z), dtype=np.float32)


# ------------------------------------------------------------------ frame ---


def normalise_pixels(features: np.ndarray) -> np.ndarray:
    """``(V, C, h, w)`` -> ``(V*h*w, C)`` float32 with every pixel vector L2-normalised."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 4:
        raise ValueError(f"expected features of shape (V, C, h, w), got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    flat = np.ascontiguousarray(f.transpose(0, 2, 3, 1)).reshape(-1, f.shape[1])
    norms = np.sqrt(np.einsum("nc,nc->n", flat, flat))[:, None]
    return flat / np.maximum(norms, 1e-8)


@dataclass
class ChroMapFrame:
    """Everything fitted on one scan's views: z-score statistics, reducer, ellipse.

    Attributes:
        mean, std: ``(C,)`` float32 per-channel statistics of the pooled pixels.
        reducer: fitted ``(N, C) -> (N, 2)`` map.
        ellipse: enclosing ellipse in the reducer plane.
    """

    mean: np.ndarray
    std: np.ndarray
    reducer: Reducer
    ellipse: Ellipse

    def plane(self, features: np.ndarray) -> np.ndarray:
        """``(V, C, h, w)`` -> ``(V*h*w, 2)`` reducer-plane coordinates (view-major, row-major)."""
        z = (normalise_pixels(features) - self.mean) / self.std
        return np.asarray(self.reducer.transform(z), dtype=np.float32)

    def disc(self, features: np.ndarray) -> np.ndarray:
        """``(V, C, h, w)`` -> ``(V*h*w, 2)`` unit-disc coordinates (new features may fall outside)."""
        return self.ellipse.to_disc(self.plane(features))

    def colours(self, features: np.ndarray) -> np.ndarray:
        """``(C, h, w)`` features of one view -> ``(h, w, 3)`` float32 RGB in this frame."""
        f = np.asarray(features)
        if f.ndim != 3:
            raise ValueError(f"expected (C, h, w) features, got {f.shape}")
        return disc_colours(self.disc(f[None])).reshape(f.shape[1], f.shape[2], 3)


def fit_frame(features: np.ndarray, reducer: str = "pca", seed: int = 0,
              fit_pixels: int = UMAP_FIT_PIXELS) -> tuple[ChroMapFrame, np.ndarray]:
    """Fit a :class:`ChroMapFrame` on ``(V, C, h, w)`` features; also return the ``(N, 2)`` plane points."""
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}; choose one of {', '.join(REDUCERS)}")
    x = normalise_pixels(features)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    z = (x - mean) / std
    red: Reducer = PCAReducer.fit(z) if reducer == "pca" else UMAPReducer.fit(z, seed, fit_pixels)
    plane = np.asarray(red.transform(z), dtype=np.float32)
    return ChroMapFrame(mean, std, red, khachiyan_mvee(plane)), plane


def reference_chromap(features: np.ndarray, seed: int = 0,
                      geometry: Geometry | None = None) -> ChroMap:
    """The reference CHRO-map (UMAP on every pixel of every view); for comparison and timing."""
    x = normalise_pixels(features)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    plane = reference_umap((x - mean) / std, seed)
    frame = ChroMapFrame(mean, std, FittedOnly(), khachiyan_mvee(plane))
    v, _, h, w = np.shape(features)
    return ChroMap(frame, plane, (v, h, w), geometry)


# ---------------------------------------------------------------- chromap ---


class ChroMap:
    """CHRO-maps of one scan's views in one colour frame.

    Build with :meth:`fit`. Attributes:
        frame: the reusable :class:`ChroMapFrame`.
        plane: ``(N, 2)`` reducer-plane points, ``N = V*h*w`` (view-major).
        embedding: ``(N, 2)`` float32 unit-disc coordinates of the same points.
        view_rgb: ``(V, h, w, 3)`` uint8 colours at feature size.
        geometry: native <-> model geometry used by :meth:`overlay`, or None.
    """

    def __init__(self, frame: ChroMapFrame, plane: np.ndarray, shape: tuple[int, int, int],
                 geometry: Geometry | None = None) -> None:
        self.frame = frame
        self.plane = plane
        self.embedding = frame.ellipse.to_disc(plane)
        v, h, w = shape
        hue, sat = disc_hsv(self.embedding.reshape(v, h, w, 2))
        self._hs = np.stack([np.round(hue * 256) % 256, np.round(sat * 255)], -1).astype(np.uint8)
        self.view_rgb = _to_uint8(hsv_to_rgb(hue, sat))
        self.geometry = geometry

    @classmethod
    def fit(cls, features: np.ndarray, reducer: str = "pca", seed: int = 0,
            geometry: Geometry | None = None, fit_pixels: int = UMAP_FIT_PIXELS) -> ChroMap:
        """Fit one frame on ``(V, C, h, w)`` decoder features of all views of one scan."""
        frame, plane = fit_frame(features, reducer=reducer, seed=seed, fit_pixels=fit_pixels)
        v, _, h, w = np.shape(features)
        return cls(frame, plane, (v, h, w), geometry)

    @property
    def n_views(self) -> int:
        return len(self.view_rgb)

    def colours(self, features: np.ndarray) -> np.ndarray:
        """``(C, h, w)`` -> ``(h, w, 3)`` float32 RGB in the fitted frame (no refit)."""
        return self.frame.colours(features)

    def rgb(self, v: int, native_shape: tuple[int, int], geometry: Geometry | None = None) -> np.ndarray:
        """Colours of view ``v`` upsampled (nearest) to ``native_shape`` -> ``(H, W, 3)`` uint8."""
        return self._upsample(self.view_rgb[v], native_shape, geometry)

    def overlay(self, v: int, image_native: np.ndarray, alpha: float = 0.5, mode: str = "blend",
                geometry: Geometry | None = None) -> np.ndarray:
        """CHRO-map of view ``v`` over its grey ``(H, W)`` [0, 1] image -> ``(H, W, 3)`` uint8.

        ``blend``: ``alpha * colour + (1 - alpha) * grey`` (reference alpha 0.5).
        ``aggregated``: the image keeps its brightness (HSV value) and takes the
        map's hue and saturation; ``alpha`` is not used.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        img = np.asarray(image_native)
        if img.ndim != 2:
            raise ValueError(f"expected a 2-D native image, got shape {img.shape}")
        grey = _to_uint8(img)
        if mode == "blend":
            rgb = self.rgb(v, img.shape, geometry)
            return cv2.addWeighted(rgb, alpha, cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), 1 - alpha, 0)
        hs = self._upsample(self._hs[v], img.shape, geometry)
        hsv = np.concatenate([hs, grey[..., None]], axis=-1)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)

    # -- linking pixels and embedding points (the viewer's linked CHRO-map) ---------

    @property
    def feature_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the feature grid of one view."""
        return tuple(self.view_rgb.shape[1:3])

    def index_of(self, v: int, row: float, col: float) -> int:
        """Embedding index of native pixel ``(row, col)`` of view ``v`` (nearest feature cell).

        Uses the fitted geometry (native -> padded square -> feature grid); without one,
        the native image is taken to fill the grid.
        """
        h, w = self.feature_shape
        geo = self.geometry
        if geo is not None:
            r = (float(row) + geo.pad_top) * geo.size / geo.side
            c = (float(col) + geo.pad_left) * geo.size / geo.side
        else:
            r, c = float(row), float(col)
        r_i = int(np.clip(np.floor(r), 0, h - 1))
        c_i = int(np.clip(np.floor(c), 0, w - 1))
        return int(v * h * w + r_i * w + c_i)

    def select_near(self, index: int, radius: float = 0.08) -> np.ndarray:
        """``(V, h, w)`` bool: the pixels of every view whose embedding lies within ``radius``
        (unit-disc units) of point ``index``: the same feature, wherever it is."""
        d = np.hypot(*(self.embedding - self.embedding[index]).T)
        return (d <= radius).reshape(self.n_views, *self.feature_shape)

    def select_region(self, lo: tuple[float, float], hi: tuple[float, float]) -> np.ndarray:
        """``(V, h, w)`` bool: the pixels whose embedding lies in the box ``lo``..``hi``
        (unit-disc x, y), e.g. a region brushed in the embedding plot."""
        (x0, y0), (x1, y1) = np.minimum(lo, hi), np.maximum(lo, hi)
        e = self.embedding
        inside = (e[:, 0] >= x0) & (e[:, 0] <= x1) & (e[:, 1] >= y0) & (e[:, 1] <= y1)
        return inside.reshape(self.n_views, *self.feature_shape)

    def mask_native(self, mask: np.ndarray, native_shape: tuple[int, int]) -> np.ndarray:
        """``(h, w)`` bool feature-grid mask -> ``(H, W)`` bool at native size (nearest)."""
        small = np.ascontiguousarray(mask, dtype=np.uint8)
        return self._upsample(small, native_shape, None).astype(bool)

    def _upsample(self, small: np.ndarray, native_shape: tuple[int, int],
                  geometry: Geometry | None) -> np.ndarray:
        geo = geometry if geometry is not None else self.geometry
        h, w = int(native_shape[0]), int(native_shape[1])
        if geo is not None:
            if tuple(geo.native_shape) != (h, w):
                raise ValueError(f"geometry is for native {geo.native_shape}, image is {(h, w)}")
            if geo.size != small.shape[0] or small.shape[0] != small.shape[1]:
                raise ValueError(f"geometry size {geo.size} does not match features {small.shape[:2]}")
            return geo.to_native(small, nearest=True)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 (clipped)."""
    return (np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
