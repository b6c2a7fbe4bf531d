"""Dense contrastive losses of METHOD §3, all on one masked-InfoNCE core.

Core (SupCon form, Khosla et al., NeurIPS 2020), for anchor i with positive
set P(i) and denominator set A(i), temperature tau::

    l_i = -(1/|P(i)|) sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau) )

averaged over the anchors with at least one positive. The similarity matrix
is never built whole: anchor rows are processed in chunks, and the backward
recomputes each chunk (an analytic gradient, no autograd graph of the chunks),
so peak memory is a few chunk x keys matrices (measured in
docs/pretraining.md) instead of the full (V*B*N)^2 matrix and its autograd
buffers.

Pixel losses take embeddings ``z`` of shape ``(B, V, N, D)`` (B images, V
views, N sampled canonical pixels, L2-normalised D-dim embeddings), the
canonical positions ``(B, N, 2)`` in units of the image side, and for the
supervised variants the silver class of each canonical pixel ``(B, N)``.
Under ``torch.distributed`` the keys are gathered from every rank (the
gather passes gradients back to their owner), anchors stay local.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from monai.losses import ContrastiveLoss
from torch.nn.modules.loss import _Loss

_MASKED = -1.0e4  # finite "minus infinity": exp() is exactly 0, no inf - inf NaNs

MaskFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _chunk_terms(a, k, pos, den, temperature):
    """Per-anchor log-probabilities of one chunk of rows: ``(log_prob, pos, n_pos, used)``."""
    pos = pos & den
    logits = (a @ k.T) / temperature
    logits = logits.masked_fill(~den, _MASKED)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = pos.sum(dim=1)
    return log_prob, pos, n_pos, n_pos > 0


class _MaskedInfoNCE(torch.autograd.Function):
    """Row-chunked SupCon loss with an analytic, recomputing backward.

    Nothing of size (chunk x Nk) is kept between forward and backward; the
    backward recomputes each chunk's softmax. For row i with softmax s_i over
    A(i) and positives P(i): d l_i / d logit_ij = s_ij - [j in P(i)] / |P(i)|.
    """

    @staticmethod
    def forward(ctx, anchors, keys, masks, temperature, rows):  # type: ignore[override]
        total = anchors.new_zeros((), dtype=torch.float64)
        count = 0
        for start in range(0, anchors.shape[0], rows):
            a = anchors[start : start + rows]
            log_prob, pos, n_pos, used = _chunk_terms(a, keys, *masks(start, start + a.shape[0]),
                                                      temperature)
            per_anchor = -torch.where(pos, log_prob, 0.0).sum(dim=1) / n_pos.clamp(min=1)
            total += torch.where(used, per_anchor, 0.0).sum().double()
            count += int(used.sum())
        ctx.save_for_backward(anchors, keys)
        ctx.masks, ctx.temperature, ctx.rows = masks, temperature, rows
        out_count = torch.tensor(count, device=anchors.device)
        ctx.mark_non_differentiable(out_count)
        return total.to(anchors.dtype), out_count

    @staticmethod
    def backward(ctx, grad_total, _grad_count):  # type: ignore[override]
        anchors, keys = ctx.saved_tensors
        grad_a = torch.zeros_like(anchors)
        grad_k = torch.zeros_like(keys)
        scale = grad_total.to(anchors.dtype) / ctx.temperature
        for start in range(0, anchors.shape[0], ctx.rows):
            a = anchors[start : start + ctx.rows]
            log_prob, pos, n_pos, used = _chunk_terms(a, keys, *ctx.masks(start, start + a.shape[0]),
                                                      ctx.temperature)
            weight = (used.to(a.dtype) / n_pos.clamp(min=1).to(a.dtype))[:, None]
            g = (torch.exp(log_prob) * used[:, None] - pos.to(a.dtype) * weight) * scale
            grad_a[start : start + a.shape[0]] = g @ keys
            grad_k += g.T @ a
        return grad_a, grad_k, None, None, None


def masked_info_nce(
    anchors: torch.Tensor,
    keys: torch.Tensor,
    masks: MaskFn,
    temperature: float,
    max_chunk_elements: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the SupCon anchor losses and the number of anchors used.

    Args:
        anchors: ``(Na, D)``.
        keys: ``(Nk, D)``.
        masks: ``masks(start, stop)`` -> ``(P, A)``, two ``(stop - start, Nk)`` bool
            masks for anchor rows ``start:stop``: positives and denominator. P is
            intersected with A. A row with no positive is skipped (not an anchor).
        temperature: tau.
        max_chunk_elements: rows per chunk = max(1, this // Nk); bounds memory.

    Returns:
        ``(loss_sum, count)``, both 0-dim tensors; the loss is ``loss_sum / count``.
        Gradients flow to ``anchors`` and ``keys`` (the same tensor may be both).
    """
    if anchors.ndim != 2 or keys.ndim != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(
            f"anchors {tuple(anchors.shape)} and keys {tuple(keys.shape)} must be (Na, D) and (Nk, D)"
        )
    rows = max(1, max_chunk_elements // max(keys.shape[0], 1))
    return _MaskedInfoNCE.apply(anchors, keys, masks, temperature, rows)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient into the owner's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks (dim 0), differentiable; identity without DDP."""
    if not distributed():
        return x
    if x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@dataclass
class _Pixels:
    """Flattened embeddings with the metadata the positive rules need."""

    z: torch.Tensor  # (M, D)
    image: torch.Tensor  # (M,) global image id
    view: torch.Tensor  # (M,)
    position: torch.Tensor  # (M, 2)
    label: torch.Tensor | None  # (M,)
    uid: torch.Tensor  # (M,) unique id over all ranks


def _flatten(z, positions, labels, views, offset: int) -> _Pixels:
    """``z (B, V, N, D)`` restricted to ``views`` -> flat pixels, image ids offset by rank."""
    b, v_all, n, _ = z.shape
    sel = z[:, views]  # (B, v, N, D)
    v = sel.shape[1]
    dev = z.device
    image = (torch.arange(b, device=dev) + offset).view(b, 1, 1).expand(b, v, n)
    view = torch.as_tensor(views, device=dev).view(1, v, 1).expand(b, v, n)
    sample = torch.arange(n, device=dev).view(1, 1, n).expand(b, v, n)
    uid = (image * v_all + view) * n + sample
    pos = positions.to(dev).unsqueeze(1).expand(b, v, n, 2)
    lab = None if labels is None else labels.to(dev).long().unsqueeze(1).expand(b, v, n).reshape(-1)
    return _Pixels(
        z=sel.reshape(-1, z.shape[-1]), image=image.reshape(-1), view=view.reshape(-1),
        position=pos.reshape(-1, 2), label=lab, uid=uid.reshape(-1),
    )


def _gather_pixels(p: _Pixels) -> _Pixels:
    if not distributed():
        return p
    return _Pixels(
        z=gather(p.z), image=gather(p.image), view=gather(p.view), position=gather(p.position),
        label=None if p.label is None else gather(p.label), uid=gather(p.uid),
    )


class _PixelContrastLoss(_Loss):
    """Shared input checks and the anchor/key plumbing of the pixel losses."""

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

    def _offset(self, z: torch.Tensor) -> int:
        return dist.get_rank() * z.shape[0] if distributed() else 0

    def _positives(self, a: _Pixels, k: _Pixels, s: int, e: int) -> torch.Tensor:
        raise NotImplementedError

    def _contrast(self, a: _Pixels, k: _Pixels, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
        def masks(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
            pos = self._positives(a, k, s, e)
            if self.supervised:  # background pixels are keys, never anchors
                pos = pos & (a.label[s:e] != self.background)[:, None]
            if exclude_self:
                den = a.uid[s:e, None] != k.uid[None, :]
            else:
                den = torch.ones_like(pos)
            return pos, den

        return masked_info_nce(a.z.float(), k.z.float(), masks, self.temperature,
                               self.max_chunk_elements)


class _DualViewLoss(_PixelContrastLoss):
    def forward(self, z: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ``(B, V, N, D)``, positions ``(B, N, 2)``, labels ``(B, N)`` -> scalar."""
        self._check(z, positions, labels)
        if z.shape[1] < 2:
            raise ValueError(f"dual-view loss needs V >= 2 views, got embeddings {tuple(z.shape)}")
        off = self._offset(z)
        losses = []
        for k in range(1, z.shape[1]):
            first = _flatten(z, positions, labels, [0], off)
            other = _flatten(z, positions, labels, [k], off)
            terms = []
            for anchors, keys in ((first, other), (other, first)):
                s, c = self._contrast(anchors, _gather_pixels(keys), exclude_self=False)
                terms.append(s / c.clamp(min=1))
            losses.append((terms[0] + terms[1]) / 2)
        return torch.stack(losses).mean()


class _MultiViewLoss(_PixelContrastLoss):
    def forward(self, z: torch.Tensor, positions: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """z ``(B, V, N, D)``, positions ``(B, N, 2)``, labels ``(B, N)`` -> scalar."""
        self._check(z, positions, labels)
        local = _flatten(z, positions, labels, list(range(z.shape[1])), self._offset(z))
        s, c = self._contrast(local, _gather_pixels(local), exclude_self=True)
        return s / c.clamp(min=1)


class DVDLoss(_DualViewLoss):
    """Dual-view dense contrastive loss (DVD-CL), Lafargue-Hauret et al., ISBI 2026
    (arXiv 2603.17110), METHOD §3.

    For each k = 1..V-1, anchors of view 0 against keys of view k (pooled over
    the batch) and the reverse, averaged; then averaged over k. Positive: same
    image and same canonical pixel. Denominator: every key of the other view
    (the positive, the other pixels of that image and all pixels of the other
    images).

    Inputs: ``z (B, V, N, D)`` L2-normalised, ``positions (B, N, 2)``.
    """

    def _positives(self, a, k, s, e):
        same_img = a.image[s:e, None] == k.image[None, :]
        same_px = (a.position[s:e, None, :] == k.position[None, :, :]).all(dim=-1)
        return same_img & same_px


class VADeRLoss(DVDLoss):
    """VADeR (Pinheiro et al., "Unsupervised Learning of Dense Visual
    Representations", NeurIPS 2020): the DVD loss on two augmented views of the
    real image (no counterfactuals). Inputs as :class:`DVDLoss` with V = 2."""


class MVDLoss(_MultiViewLoss):
    """Multi-view dense contrastive loss (MVD-CL), Lafargue-Hauret et al., ISBI 2026
    (arXiv 2603.17110), METHOD §3.

    All V views in one similarity matrix including same-view pairs, self
    excluded from numerator and denominator. Positive: same image, canonical
    positions within ``radius`` (Euclidean, in units of the image side), any view.

    Inputs: ``z (B, V, N, D)`` L2-normalised, ``positions (B, N, 2)``.
    """

    def __init__(self, temperature: float = 0.7, radius: float = 0.1, **kw) -> None:
        super().__init__(temperature=temperature, **kw)
        self.radius = radius

    def _positives(self, a, k, s, e):
        same_img = a.image[s:e, None] == k.image[None, :]
        d2 = ((a.position[s:e, None, :] - k.position[None, :, :]) ** 2).sum(dim=-1)
        not_self = a.uid[s:e, None] != k.uid[None, :]
        return same_img & (d2 <= self.radius**2) & not_self


class SupervisedDVDLoss(_DualViewLoss):
    """S-DVD-CL, Lafargue-Hauret et al., ISBI 2026, METHOD §3: :class:`DVDLoss` with
    positives = keys of the same silver class (same or other images); background
    pixels are keys but never anchors.

    Inputs: ``z (B, V, N, D)``, ``positions (B, N, 2)``, ``labels (B, N)``.
    """

    supervised = True

    def _positives(self, a, k, s, e):
        return a.label[s:e, None] == k.label[None, :]


class SupervisedMVDLoss(_MultiViewLoss):
    """S-MVD-CL, Lafargue-Hauret et al., ISBI 2026, METHOD §3: :class:`MVDLoss` with
    positives = pixels of the same silver class in any view of any image (self
    excluded); background pixels are keys but never anchors.

    Inputs: ``z (B, V, N, D)``, ``positions (B, N, 2)``, ``labels (B, N)``.
    """

    supervised = True

    def _positives(self, a, k, s, e):
        return (a.label[s:e, None] == k.label[None, :]) & (a.uid[s:e, None] != k.uid[None, :])


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
