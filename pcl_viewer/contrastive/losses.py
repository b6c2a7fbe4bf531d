"""Dense contrastive losses of docs/method.md §3, all on one masked-InfoNCE core.

Core (SupCon form, Khosla et al., NeurIPS 2020; :mod:`.infonce`), for anchor i
with positive set P(i) and denominator set A(i), temperature tau::

    l_i = -(1/|P(i)|) sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau) )

averaged over the anchors with at least one positive. The similarity matrix
is never built whole: anchor rows are processed in chunks and the backward
recomputes them, so peak memory is a few chunk x keys matrices (measured in
docs/pretraining.md), not the (V*B*N)^2 matrix and its autograd buffers.

Pixel losses take embeddings ``z`` of shape ``(B, V, N, D)`` (B images, V
views, N sampled canonical pixels, L2-normalised D-dim embeddings), the
canonical positions ``(B, N, 2)`` in units of the image side, and for the
supervised variants the silver class of each canonical pixel ``(B, N)``.
Under ``torch.distributed`` the keys are gathered from every rank (the
gather passes gradients back to their owner), anchors stay local; positives
of the unsupervised losses are always in the same image, hence local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from monai.losses import ContrastiveLoss
from torch.nn.modules.loss import _Loss

from pcl_viewer.contrastive.infonce import (
    distributed,
    gather,
    masked_info_nce,
    supcon,
    supcon_pair,
    supcon_symmetric,
)

__all__ = [
    "DVDLoss", "MVDLoss", "SupervisedDVDLoss", "SupervisedMVDLoss", "VADeRLoss", "SSDCLLoss",
    "SimCLRLoss", "PIXEL_LOSSES", "masked_info_nce", "supcon",
]


def _class_sums(keys: torch.Tensor, labels: torch.Tensor, n_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, D)``, ``(M,)`` -> per-class key sums ``(C, D)`` and counts ``(C,)``."""
    sums = keys.new_zeros(n_classes, keys.shape[1]).index_add(0, labels, keys)
    return sums, torch.bincount(labels, minlength=n_classes)


class _PixelContrastLoss(_Loss):
    """Shared input checks and settings of the pixel losses."""

    supervised = False

    def __init__(self, temperature: float = 0.7, background: int = 0,
                 max_chunk_elements: int = 1 << 22) -> None:
        super().__init__()
        self.temperature = temperature
        self.background = background
        self.max_chunk_elements = max_chunk_elements

    def _check(self, z, positions, labels) -> None:
        if z.ndim != 4:
            raise ValueError(f"embeddings must be (B, V, N, D), got {tuple(z.shape)}")
        if positions.shape != (z.shape[0], z.shape[2], 2):
            raise ValueError(
                f"positions {tuple(positions.shape)} do not match embeddings {tuple(z.shape)}: "
                "expected (B, N, 2)"
            )
        if self.supervised and labels is None:
            raise ValueError(f"{type(self).__name__} needs silver labels (B, N)")
        if labels is not None and labels.shape != (z.shape[0], z.shape[2]):
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match embeddings {tuple(z.shape)}: expected (B, N)"
            )

    def _supcon(self, anchors, keys, psum, pcount, anchor_mask=None, self_index=None):
        return supcon(anchors, keys, psum, pcount, self.temperature, anchor_mask, self_index,
                      self.max_chunk_elements)


class _DualViewLoss(_PixelContrastLoss):
    def forward(self, z: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ``(B, V, N, D)``, positions ``(B, N, 2)``, labels ``(B, N)`` -> scalar."""
        self._check(z, positions, labels)
        if z.shape[1] < 2:
            raise ValueError(f"dual-view loss needs V >= 2 views, got embeddings {tuple(z.shape)}")
        z = z.float()
        b, v, n, d = z.shape
        terms = []
        for k in range(1, v):
            if not distributed():  # both directions from one pass over the pair's matrix
                first, other = z[:, 0], z[:, k]
                flat0, flatk = first.reshape(b * n, d), other.reshape(b * n, d)
                pos0 = self._positives(other, flatk, positions, labels)
                posk = self._positives(first, flat0, positions, labels)
                terms.append(supcon_pair(flat0, flatk, pos0, posk, self.temperature,
                                         self.max_chunk_elements) / 2)
                continue
            pair = []
            for va, vk in ((0, k), (k, 0)):  # symmetrised; keys gathered over ranks
                anchors = z[:, va].reshape(b * n, d)
                local_keys = z[:, vk]
                keys = gather(local_keys.reshape(b * n, d))
                psum, pcount, mask = self._positives(local_keys, keys, positions, labels)
                pair.append(self._supcon(anchors, keys, psum, pcount, mask))
            terms.append((pair[0] + pair[1]) / 2)
        return torch.stack(terms).mean()

    def _positives(self, local_keys, keys, positions, labels):
        raise NotImplementedError


class _MultiViewLoss(_PixelContrastLoss):
    def forward(self, z: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ``(B, V, N, D)``, positions ``(B, N, 2)``, labels ``(B, N)`` -> scalar."""
        self._check(z, positions, labels)
        z = z.float()
        anchors = z.reshape(-1, z.shape[-1])
        keys = gather(anchors)
        rank = dist.get_rank() if distributed() else 0
        self_index = rank * anchors.shape[0] + torch.arange(anchors.shape[0], device=z.device)
        psum, pcount, mask = self._positives(z, keys, positions, labels)
        if not distributed():  # anchors are the keys: use the symmetry of the matrix
            return supcon_symmetric(anchors, psum, pcount, self.temperature, mask,
                                    self.max_chunk_elements)
        return self._supcon(anchors, keys, psum, pcount, mask, self_index)

    def _positives(self, z, keys, positions, labels):
        raise NotImplementedError


class DVDLoss(_DualViewLoss):
    """Dual-view dense contrastive loss (DVD-CL), Lafargue-Hauret et al., ISBI 2026
    (arXiv 2603.17110), docs/method.md §3.

    For each k = 1..V-1, anchors of view 0 against keys of view k (pooled over
    the batch) and the reverse, averaged; then averaged over k. Positive: same
    image and same canonical pixel. Denominator: every key of the other view
    (the positive, the other pixels of that image and all pixels of the other
    images).

    Inputs: ``z (B, V, N, D)`` L2-normalised, ``positions (B, N, 2)``.
    """

    def _positives(self, local_keys, keys, positions, labels):
        # same image (hence this rank's keys) and same canonical pixel: one id per
        # (image, pixel), key sums per id; O(B N D) memory, duplicates included
        b, n, d = local_keys.shape
        image = torch.arange(b, device=positions.device).repeat_interleave(n)
        rows = torch.cat([image[:, None].to(positions.dtype), positions.reshape(-1, 2)], dim=1)
        _, ids = torch.unique(rows, dim=0, return_inverse=True)
        sums, counts = _class_sums(local_keys.reshape(-1, d), ids, int(ids.max()) + 1)
        return sums[ids], counts[ids], None


class VADeRLoss(DVDLoss):
    """VADeR (Pinheiro et al., "Unsupervised Learning of Dense Visual
    Representations", NeurIPS 2020): the DVD loss on two augmented views of the
    real image (no counterfactuals). Inputs as :class:`DVDLoss` with V = 2."""


class MVDLoss(_MultiViewLoss):
    """Multi-view dense contrastive loss (MVD-CL), Lafargue-Hauret et al., ISBI 2026
    (arXiv 2603.17110), docs/method.md §3.

    All V views in one similarity matrix including same-view pairs, self
    excluded from numerator and denominator. Positive: same image, canonical
    positions within ``radius`` (Euclidean, in units of the image side), any view.

    Inputs: ``z (B, V, N, D)`` L2-normalised, ``positions (B, N, 2)``.
    """

    def __init__(self, temperature: float = 0.7, radius: float = 0.1, **kw) -> None:
        super().__init__(temperature=temperature, **kw)
        self.radius = radius

    def _positives(self, z, keys, positions, labels):
        b, v, n, d = z.shape
        d2 = ((positions[:, :, None, :] - positions[:, None, :, :]) ** 2).sum(dim=-1)
        near = (d2 <= self.radius**2).to(z.dtype)  # (B, N, N), includes the pixel itself
        # sum over all views of the neighbours' embeddings, minus the anchor itself
        around = torch.bmm(near, z.sum(dim=1))  # (B, N, D)
        psum = (around[:, None] - z).reshape(-1, d)
        pcount = (v * near.sum(dim=-1) - 1)[:, None].expand(b, v, n).reshape(-1)
        return psum, pcount, None


class SupervisedDVDLoss(_DualViewLoss):
    """S-DVD-CL, Lafargue-Hauret et al., ISBI 2026, docs/method.md §3: :class:`DVDLoss` with
    positives = keys of the same silver class (same or other images); background
    pixels are keys but never anchors.

    Inputs: ``z (B, V, N, D)``, ``positions (B, N, 2)``, ``labels (B, N)``.
    """

    supervised = True

    def _positives(self, local_keys, keys, positions, labels):
        lab = labels.reshape(-1).long()
        key_lab = gather(lab)
        sums, counts = _class_sums(keys, key_lab, int(key_lab.max()) + 1)
        return sums[lab], counts[lab], lab != self.background


class SupervisedMVDLoss(_MultiViewLoss):
    """S-MVD-CL, Lafargue-Hauret et al., ISBI 2026, docs/method.md §3: :class:`MVDLoss` with
    positives = pixels of the same silver class in any view of any image (self
    excluded); background pixels are keys but never anchors.

    Inputs: ``z (B, V, N, D)``, ``positions (B, N, 2)``, ``labels (B, N)``.
    """

    supervised = True

    def _positives(self, z, keys, positions, labels):
        b, v, n, d = z.shape
        lab = labels.long()[:, None].expand(b, v, n).reshape(-1)
        key_lab = gather(lab)
        sums, counts = _class_sums(keys, key_lab, int(key_lab.max()) + 1)
        flat = z.reshape(-1, d)
        return sums[lab] - flat, counts[lab] - 1, lab != self.background


class SSDCLLoss(SupervisedMVDLoss):
    """SSDCL baseline of the reference table: the supervised all-view loss
    (:class:`SupervisedMVDLoss`) on augmented views of the real image only, no
    counterfactuals. Inputs as :class:`SupervisedMVDLoss`."""


class SimCLRLoss(_Loss):
    """Image-level NT-Xent (Chen et al., ICML 2020) with tau = 0.5, by
    :class:`monai.losses.ContrastiveLoss`; the second view is the effusion
    counterfactual. Under DDP both views are gathered over ranks (with gradient).

    Inputs: ``z1 (B, F)`` and ``z2 (B, F)`` global embeddings (any norm).
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.nt_xent = ContrastiveLoss(temperature=temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape:
            raise ValueError(f"views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
        return self.nt_xent(gather(z1.float()), gather(z2.float()))


PIXEL_LOSSES: dict[str, type[_PixelContrastLoss]] = {
    "dvd": DVDLoss, "mvd": MVDLoss, "s-dvd": SupervisedDVDLoss, "s-mvd": SupervisedMVDLoss,
    "vader": VADeRLoss, "ssdcl": SSDCLLoss,
}
