"""The masked-InfoNCE (SupCon) core shared by every pixel loss, and the gather.

For anchor i with positives P(i) and denominator set A(i), temperature tau,
with s_ij = z_i . z_j / tau (Khosla et al., NeurIPS 2020)::

    l_i = -(1/|P(i)|) sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )
        = LSE_{a in A(i)}(s_ia) - (1/|P(i)|) sum_{p in P(i)} s_ip

Two implementations of the same formula:

- :func:`masked_info_nce`: general ``(P, A)`` boolean masks built chunk by
  chunk; simple and fully general (used to cross-check).
- :func:`supcon`: the form the losses use. ``A(i)`` is "all keys" or "all keys
  but i itself", so the log-sum-exp needs no mask: one matmul, one exp and a
  row sum per chunk of anchor rows (:class:`_ChunkedLogSumExp`, analytic
  recomputing backward, nothing of size chunk x keys kept). The positive term
  is linear in the keys, so each loss passes ``sum_{p in P(i)} z_p`` computed
  from its structure (same canonical pixel, radius neighbourhood, same class)
  at a cost of O(N x D) or one N x N matrix per image instead of the whole
  (V*B*N)^2 similarity matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

MaskFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]

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


class _ChunkedLogSumExp(torch.autograd.Function):
    """``sum_i w_i * log sum_{j != self_i} exp(a_i . k_j / tau)``, rows in chunks.

    The backward recomputes each chunk: d/d s_ij = w_i * softmax_ij (self excluded).
    """

    @staticmethod
    def forward(ctx, anchors, keys, weights, self_index, temperature, rows):  # type: ignore[override]
        # |a.k| / tau <= max|a| max|k| / tau: subtracting that bound keeps exp() <= 1
        shift = float(anchors.detach().norm(dim=1).max() * keys.detach().norm(dim=1).max()) / temperature
        lse = torch.empty(anchors.shape[0], dtype=anchors.dtype, device=anchors.device)
        for start in range(0, anchors.shape[0], rows):
            e = _exp_chunk(anchors, keys, self_index, temperature, start, rows, shift)
            lse[start : start + e.shape[0]] = e.sum(dim=1).clamp(min=1e-30).log() + shift
        ctx.save_for_backward(anchors, keys, weights, lse)
        ctx.self_index, ctx.temperature, ctx.rows = self_index, temperature, rows
        return (weights * lse).sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        anchors, keys, weights, lse = ctx.saved_tensors
        grad_a = torch.zeros_like(anchors)
        grad_k = torch.zeros_like(keys)
        for start in range(0, anchors.shape[0], ctx.rows):
            stop = min(start + ctx.rows, anchors.shape[0])
            e = _exp_chunk(anchors, keys, ctx.self_index, ctx.temperature, start, ctx.rows,
                           lse[start:stop, None])
            e.mul_((weights[start:stop] * grad / ctx.temperature)[:, None])
            grad_a[start:stop] = e @ keys
            grad_k.addmm_(e.T, anchors[start:stop])
        return grad_a, grad_k, None, None, None, None


def _exp_chunk(anchors, keys, self_index, temperature, start, rows, shift):
    """``exp(a_i . k_j / tau - shift)`` for rows ``start:start+rows``, self entries 0."""
    a = anchors[start : start + rows]
    e = (a @ keys.T).mul_(1.0 / temperature).sub_(shift).exp_()
    if self_index is not None:
        idx = self_index[start : start + rows]
        e[torch.arange(e.shape[0], device=e.device), idx] = 0.0
    return e


def supcon(
    anchors: torch.Tensor,
    keys: torch.Tensor,
    positive_sum: torch.Tensor,
    positive_count: torch.Tensor,
    temperature: float,
    anchor_mask: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
    max_chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """Mean SupCon loss over the anchors that have a positive.

    Args:
        anchors: ``(Na, D)``.
        keys: ``(Nk, D)``; A(i) = all keys, or all but ``keys[self_index[i]]``.
        positive_sum: ``(Na, D)`` sum of the positive keys of each anchor.
        positive_count: ``(Na,)`` |P(i)|; anchors with 0 are skipped.
        anchor_mask: ``(Na,)`` bool, False = not an anchor (e.g. background).
        self_index: ``(Na,)`` long index of the anchor itself among the keys.
        max_chunk_elements: rows per chunk = max(1, this // Nk); bounds memory.

    Returns:
        0-dim loss (0 when no anchor has a positive).
    """
    if anchors.shape != positive_sum.shape or anchors.shape[1] != keys.shape[1]:
        raise ValueError(
            f"anchors {tuple(anchors.shape)}, keys {tuple(keys.shape)} and positive sums "
            f"{tuple(positive_sum.shape)} must be (Na, D), (Nk, D), (Na, D)"
        )
    used = positive_count > 0
    if anchor_mask is not None:
        used = used & anchor_mask
    n = int(used.sum())
    if n == 0:
        return anchors.sum() * 0.0 + keys.sum() * 0.0
    weights = used.to(anchors.dtype) / n
    rows = max(1, max_chunk_elements // max(keys.shape[0], 1))
    lse = _ChunkedLogSumExp.apply(anchors, keys, weights, self_index, temperature, rows)
    pos = (anchors * positive_sum).sum(dim=1) / (temperature * positive_count.clamp(min=1))
    return lse - (weights * pos).sum()


class _ChunkedPairLogSumExp(torch.autograd.Function):
    """Both directions of one similarity matrix S = x y^T / tau in a single pass:
    ``sum_i wx_i LSE_j(S_ij) + sum_j wy_j LSE_i(S_ij)``.

    The symmetrised dual-view loss contrasts x against y and y against x; the
    second is the first's transpose, so its log-sum-exps are column sums of the
    same exponentials (one shared shift makes the chunks' column sums addable).
    """

    @staticmethod
    def forward(ctx, x, y, wx, wy, temperature, rows):  # type: ignore[override]
        shift = float(x.detach().norm(dim=1).max() * y.detach().norm(dim=1).max()) / temperature
        row_sum = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        col_sum = torch.zeros(y.shape[0], dtype=x.dtype, device=x.device)
        for start in range(0, x.shape[0], rows):
            e = _exp_chunk(x, y, None, temperature, start, rows, shift)
            row_sum[start : start + e.shape[0]] = e.sum(dim=1)
            col_sum += e.sum(dim=0)
        row_sum.clamp_(min=1e-30)
        col_sum.clamp_(min=1e-30)
        ctx.save_for_backward(x, y, wx / row_sum, wy / col_sum)
        ctx.temperature, ctx.rows, ctx.shift = temperature, rows, shift
        return (wx * (row_sum.log() + shift)).sum() + (wy * (col_sum.log() + shift)).sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, y, alpha, beta = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        grad_y = torch.zeros_like(y)
        scale = grad / ctx.temperature
        for start in range(0, x.shape[0], ctx.rows):
            stop = min(start + ctx.rows, x.shape[0])
            e = _exp_chunk(x, y, None, ctx.temperature, start, ctx.rows, ctx.shift)
            # d/dS_ij = wx_i softmax_row_ij + wy_j softmax_col_ij
            e.mul_(alpha[start:stop, None] + beta[None, :]).mul_(scale)
            grad_x[start:stop] = e @ y
            grad_y.addmm_(e.T, x[start:stop])
        return grad_x, grad_y, None, None, None, None


def _weights(positive_count, anchor_mask, like):
    used = positive_count > 0
    if anchor_mask is not None:
        used = used & anchor_mask
    n = int(used.sum())
    return used.to(like.dtype) / max(n, 1), n


def supcon_pair(
    x: torch.Tensor,
    y: torch.Tensor,
    x_positives: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    y_positives: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    temperature: float,
    max_chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """``supcon(x, y, ...) + supcon(y, x, ...)`` with one pass over ``x y^T``.

    Args:
        x, y: ``(Nx, D)`` and ``(Ny, D)``; each is the other's key set (A = all keys).
        x_positives / y_positives: ``(positive_sum, positive_count, anchor_mask)``
            of the anchors of x (keys y) and of y (keys x), as in :func:`supcon`.
    """
    if x.shape[1] != y.shape[1] or x_positives[0].shape != x.shape or y_positives[0].shape != y.shape:
        raise ValueError(
            f"x {tuple(x.shape)}, y {tuple(y.shape)} and positive sums "
            f"{tuple(x_positives[0].shape)}, {tuple(y_positives[0].shape)} do not match"
        )
    wx, nx = _weights(x_positives[1], x_positives[2], x)
    wy, ny = _weights(y_positives[1], y_positives[2], y)
    rows = max(1, max_chunk_elements // max(y.shape[0], 1))
    lse = _ChunkedPairLogSumExp.apply(x, y, wx, wy, temperature, rows)
    pos = 0.0
    for z, (psum, pcount, _), w in ((x, x_positives, wx), (y, y_positives, wy)):
        pos = pos + (w * (z * psum).sum(dim=1) / (temperature * pcount.clamp(min=1))).sum()
    return lse - pos


class _SymmetricLogSumExp(torch.autograd.Function):
    """``sum_i w_i log sum_{j != i} exp(z_i . z_j / tau)`` for anchors = keys = z.

    S is symmetric, so only the strips ``rows x (columns >= first row)`` are
    computed: their row sums serve the strip's rows and their column sums the
    later rows. Half the matmuls and exps of the plain chunked pass.
    """

    @staticmethod
    def forward(ctx, z, w, temperature, rows):  # type: ignore[override]
        shift = float(z.detach().norm(dim=1).max()) ** 2 / temperature
        row_sum = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for start in range(0, z.shape[0], rows):
            stop = min(start + rows, z.shape[0])
            e = _strip(z, start, stop, temperature, shift)
            row_sum[start:stop] += e.sum(dim=1)
            row_sum[stop:] += e[:, stop - start :].sum(dim=0)
        row_sum.clamp_(min=1e-30)
        ctx.save_for_backward(z, w / row_sum)
        ctx.temperature, ctx.rows, ctx.shift = temperature, rows, shift
        return (w * (row_sum.log() + shift)).sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, alpha = ctx.saved_tensors
        out = torch.zeros_like(z)
        for start in range(0, z.shape[0], ctx.rows):
            stop = min(start + ctx.rows, z.shape[0])
            e = _strip(z, start, stop, ctx.temperature, ctx.shift)
            # (G + G^T)_ij = E_ij (alpha_i + alpha_j): z is anchor and key at once
            e.mul_(alpha[start:stop, None] + alpha[None, start:]).mul_(grad / ctx.temperature)
            out[start:stop] += e @ z[start:]
            out[stop:].addmm_(e[:, stop - start :].T, z[start:stop])
        return out, None, None, None


def _strip(z, start, stop, temperature, shift):
    """``exp(S - shift)`` for rows ``start:stop`` and columns ``start:``, diagonal 0."""
    e = (z[start:stop] @ z[start:].T).mul_(1.0 / temperature).sub_(shift).exp_()
    i = torch.arange(stop - start, device=z.device)
    e[i, i] = 0.0
    return e


def supcon_symmetric(
    z: torch.Tensor,
    positive_sum: torch.Tensor,
    positive_count: torch.Tensor,
    temperature: float,
    anchor_mask: torch.Tensor | None = None,
    max_chunk_elements: int = 1 << 22,
) -> torch.Tensor:
    """:func:`supcon` with anchors = keys = ``z`` and A(i) = all but i, at half the cost."""
    if positive_sum.shape != z.shape:
        raise ValueError(f"z {tuple(z.shape)} and positive sums {tuple(positive_sum.shape)} differ")
    w, n = _weights(positive_count, anchor_mask, z)
    if n == 0:
        return z.sum() * 0.0
    rows = max(1, max_chunk_elements // max(z.shape[0], 1))
    lse = _SymmetricLogSumExp.apply(z, w, temperature, rows)
    pos = (z * positive_sum).sum(dim=1) / (temperature * positive_count.clamp(min=1))
    return lse - (w * pos).sum()


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
