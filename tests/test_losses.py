"""Each pixel loss equals a slow loop-by-loop reference written from docs/method.md §3."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pcl_viewer.contrastive.losses import (
    DVDLoss,
    MVDLoss,
    SimCLRLoss,
    SSDCLLoss,
    SupervisedDVDLoss,
    SupervisedMVDLoss,
    VADeRLoss,
    masked_info_nce,
)

TAU = 0.7

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _inputs(seed=0, b=3, v=3, n=6, d=5):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, v, n, d, generator=g, dtype=torch.float64), dim=-1)
    # positions on a coarse grid so that both exact matches and 0.1-neighbours occur
    pos = torch.randint(0, 12, (b, n, 2), generator=g).double() / 12
    pos[:, 1] = pos[:, 0]  # a duplicated canonical pixel in every image
    labels = torch.randint(0, 3, (b, n), generator=g)
    labels[0, 0] = 0
    return z, pos, labels


def _anchor_loss(zi, keys, pos_idx, den_idx, tau=TAU):
    """l_i = -(1/|P|) sum_p log(exp(zi.zp/tau) / sum_a exp(zi.za/tau))."""
    den = sum(math.exp(float(zi @ keys[a]) / tau) for a in den_idx)
    return -sum(math.log(math.exp(float(zi @ keys[p]) / tau) / den) for p in pos_idx) / len(pos_idx)


def _reference_dual(z, pos, labels, supervised):
    b, v, n, _ = z.shape
    per_k = []
    for k in range(1, v):
        terms = []
        for va, vk in ((0, k), (k, 0)):
            keys = [(bb, m) for bb in range(b) for m in range(n)]
            kz = [z[bb, vk, m] for bb, m in keys]
            losses = []
            for bi in range(b):
                for i in range(n):
                    if supervised and labels[bi, i] == 0:
                        continue
                    if supervised:
                        p = [j for j, (bb, m) in enumerate(keys) if labels[bb, m] == labels[bi, i]]
                    else:
                        p = [j for j, (bb, m) in enumerate(keys)
                             if bb == bi and torch.equal(pos[bb, m], pos[bi, i])]
                    if p:
                        losses.append(_anchor_loss(z[bi, va, i], kz, p, range(len(keys))))
            terms.append(sum(losses) / len(losses))
        per_k.append((terms[0] + terms[1]) / 2)
    return sum(per_k) / len(per_k)


def _reference_multi(z, pos, labels, supervised, radius=0.1):
    b, v, n, _ = z.shape
    items = [(bb, vv, m) for bb in range(b) for vv in range(v) for m in range(n)]
    kz = [z[it] for it in items]
    losses = []
    for i, (bi, _vi, ni) in enumerate(items):
        if supervised and labels[bi, ni] == 0:
            continue
        den = [j for j in range(len(items)) if j != i]
        if supervised:
            p = [j for j in den if labels[items[j][0], items[j][2]] == labels[bi, ni]]
        else:
            p = [j for j in den if items[j][0] == bi
                 and float(torch.dist(pos[bi, ni], pos[items[j][0], items[j][2]])) <= radius]
        if p:
            losses.append(_anchor_loss(kz[i], kz, p, den))
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    ("loss", "reference", "views"),
    [
        (DVDLoss(), lambda z, p, y: _reference_dual(z, p, y, False), None),
        (VADeRLoss(), lambda z, p, y: _reference_dual(z, p, y, False), 2),
        (SupervisedDVDLoss(), lambda z, p, y: _reference_dual(z, p, y, True), None),
        (MVDLoss(), lambda z, p, y: _reference_multi(z, p, y, False), None),
        (SupervisedMVDLoss(), lambda z, p, y: _reference_multi(z, p, y, True), None),
        (SSDCLLoss(), lambda z, p, y: _reference_multi(z, p, y, True), 2),
    ],
    ids=["dvd", "vader", "s-dvd", "mvd", "s-mvd", "ssdcl"],
)
def test_loss_equals_loop_reference(loss, reference, views):
    """VADeR and SSDCL take two views (the image and one counterfactual); the others all."""
    z, pos, labels = _inputs()
    z = z[:, :views]
    got = loss(z, pos, labels)
    assert got.item() == pytest.approx(reference(z, pos, labels), abs=1e-5)


@pytest.mark.parametrize("cls", [DVDLoss, MVDLoss, SupervisedDVDLoss, SupervisedMVDLoss])
def test_chunked_rows_give_same_value_and_gradient(cls):
    z, pos, labels = _inputs(seed=1)
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    whole = cls(max_chunk_elements=1 << 30)(z1, pos, labels)
    chunked = cls(max_chunk_elements=7)(z2, pos, labels)  # one anchor row per chunk
    whole.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-6)
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


@pytest.mark.parametrize("cls", [DVDLoss, MVDLoss, SupervisedDVDLoss, SupervisedMVDLoss])
def test_matched_correspondences_give_lower_loss_than_shuffled(cls):
    g = torch.Generator().manual_seed(3)
    b, v, n, d = 4, 4, 64, 16
    base = F.normalize(torch.randn(b, 1, n, d, generator=g), dim=-1)
    labels = torch.randint(0, 3, (b, n), generator=g)
    # class-structured embeddings so the supervised losses also see matched semantics
    base = F.normalize(base + 2 * F.one_hot(labels, d).float().unsqueeze(1), dim=-1)
    z = F.normalize(base.expand(b, v, n, d) + 0.05 * torch.randn(b, v, n, d, generator=g), dim=-1)
    pos = torch.rand(b, n, 2, generator=g)
    perm = torch.randperm(n, generator=g)
    shuffled = z.clone()
    shuffled[:, 1:] = z[:, 1:, perm]
    loss = cls()
    if loss.supervised:  # shuffling for the supervised losses = wrong labels
        assert loss(z, pos, labels) < loss(z, pos, labels[:, perm])
    else:
        assert loss(z, pos, labels) < loss(shuffled, pos, labels)


@pytest.mark.parametrize("cls", [SupervisedDVDLoss, SupervisedMVDLoss])
def test_supervised_losses_never_use_background_anchors(cls):
    z, pos, labels = _inputs(seed=2)
    z = z.clone().requires_grad_()
    background_only = torch.zeros_like(labels)
    loss = cls()(z, pos, background_only)
    assert loss.item() == 0.0  # no anchor at all
    # with one lung pixel, background pixels still act as keys (they get gradient)
    one = background_only.clone()
    one[0, 2] = 1
    one[1, 3] = 1
    loss = cls()(z, pos, one)
    loss.backward()
    assert loss.item() > 0
    assert z.grad[2].abs().sum() > 0  # image 2 is all background: only ever a key


def test_core_skips_anchors_without_positive():
    a = F.normalize(torch.randn(4, 3), dim=-1)

    def masks(s, e):
        pos = torch.zeros(e - s, 4, dtype=torch.bool)
        pos[0, 1] = True  # only anchor 0 has a positive (and only if 0 in this chunk)
        if s > 0:
            pos[:] = False
        return pos, torch.ones(e - s, 4, dtype=torch.bool)

    total, count = masked_info_nce(a, a, masks, TAU)
    assert int(count) == 1
    assert total.item() == pytest.approx(_anchor_loss(a[0], a, [1], range(4)), abs=1e-5)


def test_shape_mismatch_names_both_shapes():
    z = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"\(2, 4, 2\).*\(2, 3, 5, 4\)"):
        DVDLoss()(z, torch.rand(2, 4, 2))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3, 5, 4\)"):
        SupervisedMVDLoss()(z, torch.rand(2, 5, 2), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(3, 7\)"):
        SimCLRLoss()(torch.randn(3, 8), torch.randn(3, 7))


def test_simclr_is_nt_xent_with_tau_half():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    reps = F.normalize(torch.cat([z1, z2]), dim=-1)
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        den = sum(math.exp(float(reps[i] @ reps[k]) / 0.5) for k in range(8) if k != i)
        total += -math.log(math.exp(float(reps[i] @ reps[j]) / 0.5) / den)
    assert SimCLRLoss()(z1, z2).item() == pytest.approx(total / 8, abs=1e-5)


def test_core_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(5)
    a = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(7, 3, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    pos = torch.rand(5, 7, generator=g) < 0.4
    den = torch.rand(5, 7, generator=g) < 0.8

    def f(a, k):
        return masked_info_nce(a, k, lambda s, e: (pos[s:e], den[s:e]), TAU, max_chunk_elements=14)[0]

    assert torch.autograd.gradcheck(f, (a, k))


def test_structured_core_equals_masked_core_and_has_exact_gradients():
    from pcl_viewer.contrastive.infonce import supcon

    g = torch.Generator().manual_seed(6)
    z = F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    cls = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0])
    pos = (cls[:, None] == cls[None, :]) & ~torch.eye(9, dtype=torch.bool)
    den = ~torch.eye(9, dtype=torch.bool)
    total, count = masked_info_nce(z, z, lambda s, e: (pos[s:e], den[s:e]), TAU)

    def f(z):
        psum = pos.to(z.dtype) @ z
        return supcon(z, z, psum, pos.sum(1), TAU, self_index=torch.arange(9), max_chunk_elements=18)

    assert f(z).item() == pytest.approx((total / count).item(), abs=1e-7)
    assert torch.autograd.gradcheck(f, (z,))


def test_pair_core_equals_two_directions_with_exact_gradients():
    from pcl_viewer.contrastive.infonce import supcon, supcon_pair

    g = torch.Generator().manual_seed(7)
    x = F.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    pxy = torch.rand(6, 5, generator=g) < 0.4
    pyx = torch.rand(5, 6, generator=g) < 0.4
    mask_x = torch.tensor([True, True, False, True, True, True])

    def positives(p, keys, mask=None):
        return p.to(keys.dtype) @ keys, p.sum(1), mask

    def pair(x, y):
        return supcon_pair(x, y, positives(pxy, y, mask_x), positives(pyx, x), TAU,
                           max_chunk_elements=10)

    def separate(x, y):
        return (supcon(x, y, *positives(pxy, y, mask_x)[:2], TAU, mask_x)
                + supcon(y, x, *positives(pyx, x)[:2], TAU))

    assert pair(x, y).item() == pytest.approx(separate(x, y).item(), abs=1e-10)
    assert torch.autograd.gradcheck(pair, (x, y))


def test_symmetric_core_equals_general_core_with_exact_gradients():
    from pcl_viewer.contrastive.infonce import supcon, supcon_symmetric

    g = torch.Generator().manual_seed(8)
    z = F.normalize(torch.randn(7, 3, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    p = (torch.rand(7, 7, generator=g) < 0.5) & ~torch.eye(7, dtype=torch.bool)
    mask = torch.tensor([True, False, True, True, True, True, True])

    def sym(z):
        return supcon_symmetric(z, p.to(z.dtype) @ z, p.sum(1), TAU, mask, max_chunk_elements=15)

    def general(z):
        return supcon(z, z, p.to(z.dtype) @ z, p.sum(1), TAU, mask, self_index=torch.arange(7))

    assert sym(z).item() == pytest.approx(general(z).item(), abs=1e-10)
    assert torch.autograd.gradcheck(sym, (z,))
