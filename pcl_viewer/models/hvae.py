"""Conditional hierarchical VAE: the image mechanism of the counterfactual model.

In the style of causal-gen's HVAE2 (de Sousa Ribeiro et al., ICML 2023): a
bottom-up encoder, a top-down decoder with latents at several resolutions,
parents ``pa`` (B, 3) embedded by a small MLP and injected into every prior,
posterior and residual block, a conditional prior ``p(z_l | z_<l, pa)``, a
fixed-scale discretised Gaussian likelihood and a beta-weighted KL.

Images are ``(B, 1, S, S)`` float in [0, 1]; internally they live in [-1, 1].
Counterfactual inference (docs/method.md §2) uses :meth:`HVAE.abduct` (posterior means
and the prior-relative exogenous noise of every latent) and :meth:`HVAE.decode`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from pcl_viewer.presets import IMAGE_SIZE, check_preset

_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1


def _zero_(layer: nn.Conv2d | nn.Linear) -> None:
    """Zero a layer's weight and bias (a block that starts as the identity or as nothing)."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _blocks(stage: nn.Module) -> nn.ModuleList:
    """One stage of ``enc_blocks`` / ``dec_blocks`` (a ModuleList of blocks)."""
    return cast(nn.ModuleList, stage)


@dataclass
class HVAEConfig:
    """Config of :class:`HVAE`.

    ``widths[i]`` and ``blocks[i]`` are the channel width and the number of blocks at
    resolution ``work_size / 2**i`` (the same on both paths; at a latent resolution the
    decoder's blocks are stochastic). ``latents`` maps a resolution to its latent channels.
    Blocks are causal-gen bottlenecks (1x1, 3x3, 3x3, 1x1) with ``width // bottleneck``
    hidden channels, so wide low-resolution stages stay cheap.
    """

    image_size: int = 128
    work_size: int = 64  # the HVAE runs at this size; means are upsampled to image_size
    widths: tuple[int, ...] = (16, 32, 64, 64, 64)
    blocks: tuple[int, ...] = (1, 1, 2, 2, 1)
    latents: dict[int, int] = field(default_factory=lambda: {4: 8, 8: 8, 16: 8})
    parent_dim: int = 3
    embed_dim: int = 32
    bottleneck: int = 4
    sigma: float = 0.08  # fixed likelihood std in [-1, 1] units
    bins: int = 256
    beta: float = 1.0
    top_beta: float = 2.0  # beta multiplier for latents at resolution <= top_res
    top_res: int = 8
    free_bits: float = 0.0  # nats per latent channel and position, per level
    cf_latents: str = "prior-relative"  # or "posterior": keep z fixed under intervention
    # Exogenous effusion noise: a global latent u_f (fluid_dim,) with prior N(0, I) that
    # enters the parent embedding as ``effusion * u_f``. It is the model's counterpart of
    # the side/severity noise of the SCM: inferred from the image when fluid is visible,
    # drawn from its prior (the posterior of a normal image) when fluid is added. 0: off.
    fluid_dim: int = 0
    fluid_beta: float = 1.0  # KL weight of u_f
    # "embed": u_f joins the parent embedding everywhere. "head": effusion acts only through
    # a parent-gated fluid head, mean = (tanh(out(h) + effusion * F(h, u_f)) + 1) / 2, and the
    # rest of the decoder and the priors see the parents with effusion set to 0; an effusion
    # counterfactual is then exactly the fluid F paints or removes (see FluidHead).
    fluid_mode: str = "embed"
    # KL(q(u_f | x) || N(0, I)) weight inside cf_pair_loss (nats, against a relative error
    # of order 1): keeps the codes the pairs teach distributed like the prior that adding
    # effusion draws from.
    fluid_pair_kl: float = 0.02
    # Free bits of that KL, nats per dimension of u_f (batch-mean KL below it is not
    # charged): without them the codes collapsed onto the prior (every posterior N(0, I)),
    # the head could not read a side from u_f and added one mean pattern.
    fluid_free_bits: float = 0.0
    # Codes stored with the model: posterior means of u_f on training images with effusion
    # (filled at export). Adding effusion draws one of them instead of a N(0, I) sample,
    # i.e. samples the aggregate posterior the head was trained on. 0: draw from N(0, I).
    fluid_bank: int = 0
    # Input of the u_f encoder: "pooled" (mean and max of the coarsest activation) or
    # "spatial" (the coarsest activation map, flattened).
    fluid_enc: str = "pooled"
    # Weight of an auxiliary readout of the SCM's effusion noise (side: right / left /
    # bilateral, severity) from the posterior mean of u_f, in the pair loss, where a dataset
    # carries that noise (the phantom does, real data do not). It makes u_f name the side
    # from the start: without it the head learnt to ignore u_f and u_f to say nothing. 0: off.
    fluid_aux: float = 0.0
    # The fluid head also sees the pixel coordinates (CoordConv): its convolutions alone
    # cannot tell the left base from the right one, so u_f could not choose a side.
    fluid_coords: bool = False
    # Shape of the fluid head: "local" (two 3x3 convolutions on the last decoder features,
    # a 5 px field of view at the working size) or "multiscale": it also sees the working-size
    # input image (the abducted factual itself: where fluid is, where the lung and the
    # diaphragm are) and adds a 32/16 px branch modulated by u_f, so a change can follow a
    # hemithorax. The new inputs start at zero: a warm start computes what its bundle did.
    fluid_head: str = "local"
    # Effusion also acts on the decoder's features at every resolution <= this many working
    # pixels (0: off; needs the fluid head): after each such stage, ``effusion * G(h, u_f)``
    # is added, G a small convolution FiLM-modulated by u_f (CoarseFluid). The fluid head
    # alone paints fluid where fluid is; a scanner's local contrast equalisation also
    # re-maps the brightness of the whole region around the fluid, a smooth, non-local
    # change that the coarse stages can draw. Zero at start: a warm start is unchanged.
    fluid_coarse: int = 0
    # Effusion also re-maps the tones of the region around the fluid (0: off; needs the fluid
    # head): on a grid of this many cells per side, a small network reads the decoder's last
    # features, the mean and mean square of the image in each cell and ``u_f``, and gives
    # each cell a quadratic curve of the pixel's own intensity; the curves are interpolated
    # bilinearly between cells and added, times the effusion parent, to the logits. A local
    # contrast equalisation (vendor processing) changes every pixel of a tile that holds
    # fluid by a function of that pixel's brightness and of the tile's histogram, a change a
    # decoder that only paints where fluid is cannot draw. Zero at start (LocalRemap). On
    # top of the coarse stages it measured no gain (docs/cf_model.md, run Z); an option.
    fluid_remap: int = 0

    @classmethod
    def for_preset(cls, name: str) -> HVAEConfig:
        check_preset(name)
        size = IMAGE_SIZE[name]
        if name == "smoke":
            return cls(image_size=size, work_size=32, widths=(8, 16, 16, 16),
                       blocks=(0, 1, 1, 1), latents={4: 4, 8: 4}, embed_dim=8, bottleneck=2)
        if name == "cpu":
            return cls(image_size=size)
        # Reference size (~40 M parameters): wide low-resolution stages, latents 7..56 px.
        return cls(image_size=size, work_size=size, widths=(32, 64, 128, 256, 512, 512),
                   blocks=(1, 2, 3, 6, 8, 8), latents={7: 16, 14: 16, 28: 16, 56: 8},
                   embed_dim=64)

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.work_size // 2**i for i in range(len(self.widths)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latents"] = {str(k): v for k, v in self.latents.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HVAEConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        d["blocks"] = tuple(d["blocks"])
        d["latents"] = {int(k): int(v) for k, v in d["latents"].items()}
        return cls(**d)


class Bottleneck(nn.Module):
    """causal-gen bottleneck: 1x1 -> 3x3 -> 3x3 -> 1x1 with GELUs, parents added after the
    first 1x1 (a bias, or a FiLM scale and shift), last layer zero-initialised.

    ``(B, C_in, H, W)`` and ``(B, E)`` -> ``(B, C_out, H, W)``.
    """

    def __init__(self, c_in: int, hidden: int, c_out: int, embed_dim: int = 0,
                 film: bool = False, zero_out: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, hidden, 1)
        self.c2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.c3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.c4 = nn.Conv2d(hidden, c_out, 1)
        if zero_out:
            _zero_(self.c4)
        self.film = film
        self.cond = nn.Linear(embed_dim, (2 if film else 1) * hidden) if embed_dim else None
        if self.cond is not None:
            _zero_(self.cond)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        y = self.c1(F.gelu(x))
        if self.cond is not None and e is not None:
            c = self.cond(e)[:, :, None, None]
            if self.film:
                scale, shift = c.chunk(2, dim=1)
                y = y * (1 + scale) + shift
            else:
                y = y + c
        y = self.c3(F.gelu(self.c2(F.gelu(y))))
        out: torch.Tensor = self.c4(F.gelu(y))
        return out


class ResBlock(nn.Module):
    """Residual bottleneck block; ``(B, C, H, W)`` (+ ``(B, E)``) -> ``(B, C, H, W)``."""

    def __init__(self, width: int, bottleneck: int, embed_dim: int = 0) -> None:
        super().__init__()
        self.body = Bottleneck(width, max(4, width // bottleneck), width, embed_dim, film=True)

    def forward(self, h: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        delta: torch.Tensor = self.body(h, e)
        return h + delta


class LatentBlock(nn.Module):
    """One stochastic top-down block: conditional prior, posterior, latent injection, residual."""

    def __init__(self, width: int, z_dim: int, embed_dim: int, bottleneck: int) -> None:
        super().__init__()
        hidden = max(4, width // bottleneck)
        self.z_dim = z_dim
        self.prior = Bottleneck(width, hidden, 2 * z_dim + width, embed_dim)
        self.posterior = Bottleneck(2 * width, hidden, 2 * z_dim, embed_dim)
        self.z_proj = nn.Conv2d(z_dim, width, 1)
        self.res = ResBlock(width, bottleneck, embed_dim)

    def prior_params(self, h: torch.Tensor, e: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prior mean and std ``(B, z, H, W)`` and a feature residual ``(B, C, H, W)``."""
        out: torch.Tensor = self.prior(h, e)
        loc, raw, feat = torch.split(out, [self.z_dim, self.z_dim, out.shape[1] - 2 * self.z_dim], 1)
        return loc, F.softplus(raw + _SOFTPLUS_ONE) + 1e-4, feat

    def posterior_params(self, h: torch.Tensor, enc: torch.Tensor, e: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std ``(B, z, H, W)`` given the encoder activation ``enc``."""
        loc, raw = self.posterior(torch.cat([h, enc], dim=1), e).chunk(2, dim=1)
        return loc, F.softplus(raw + _SOFTPLUS_ONE) + 1e-4

    def step(self, h: torch.Tensor, z: torch.Tensor, feat: torch.Tensor,
             e: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.res(h + feat + self.z_proj(z), e)
        return out


def gaussian_kl(q_loc: torch.Tensor, q_scale: torch.Tensor, p_loc: torch.Tensor,
                p_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(q) || N(p)), same shape as the inputs."""
    return (torch.log(p_scale / q_scale)
            + (q_scale**2 + (q_loc - p_loc) ** 2) / (2 * p_scale**2) - 0.5)


def discretised_gaussian_nll(x: torch.Tensor, loc: torch.Tensor, sigma: float,
                             bins: int = 256) -> torch.Tensor:
    """Per-pixel NLL (nats) of ``x`` in [-1, 1] under a discretised Gaussian, shape of ``x``.

    The edge bins take the whole tail mass, as in PixelCNN++ / causal-gen.
    """
    half = 1.0 / (bins - 1)
    centred = x - loc
    upper = (centred + half) / (sigma * math.sqrt(2))
    lower = (centred - half) / (sigma * math.sqrt(2))
    cdf_up = 0.5 * (1 + torch.erf(upper))
    cdf_lo = 0.5 * (1 + torch.erf(lower))
    mass = torch.where(x > 1 - 1e-3, 1 - cdf_lo, torch.where(x < -1 + 1e-3, cdf_up, cdf_up - cdf_lo))
    # Far from the mode the mass underflows: fall back to the density times bin width.
    log_density = (-0.5 * (centred / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
                   + math.log(2 * half))
    return -torch.where(mass > 1e-6, torch.log(mass.clamp_min(1e-12)), log_density)


class HVAE(nn.Module):
    """Conditional HVAE. ``forward(x (B,1,S,S) in [0,1], pa (B,3))`` -> loss terms.

    The network works at ``cfg.work_size`` (the cpu preset: 64 px for 128 px inputs): inputs
    are area-downsampled and means bilinearly upsampled. The counterfactual keeps every detail
    of ``x`` above that scale, since only the smooth residual ``mu_cf - mu`` is added.
    """

    fluid_codes: torch.Tensor | None

    def __init__(self, cfg: HVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        res, w, e = cfg.resolutions, cfg.widths, cfg.embed_dim
        missing = [r for r in cfg.latents if r not in res]
        if len(cfg.blocks) != len(w):
            raise ValueError(f"blocks {cfg.blocks} and widths {w} differ in length")
        if missing:
            raise ValueError(f"latent resolutions {missing} not in {res}")
        self.parent_embed = nn.Sequential(
            nn.Linear(cfg.parent_dim + (cfg.fluid_dim if cfg.fluid_mode == "embed" else 0), e),
            nn.GELU(), nn.Linear(e, e), nn.GELU()
        )
        # Bottom-up encoder (no parents, as in causal-gen).
        self.stem = nn.Conv2d(1, w[0], 3, padding=1)
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(ResBlock(w[i], cfg.bottleneck) for _ in range(cfg.blocks[i]))
            for i in range(len(w))
        )
        self.enc_down = nn.ModuleList(nn.Conv2d(w[i], w[i + 1], 1) for i in range(len(w) - 1))
        # Posterior q(u_f | x) of the exogenous effusion noise from the coarsest encoder
        # activation: loc and raw scale, (B, 2 * fluid_dim). "pooled": its mean and max over
        # space; "spatial": the whole activation map, which keeps where the fluid is (the
        # side of an effusion is lost in a global pool).
        coarse = cfg.work_size // 2 ** (len(w) - 1)
        n_in = {"pooled": 2 * w[-1], "spatial": w[-1] * coarse * coarse}.get(cfg.fluid_enc)
        if n_in is None:
            raise ValueError(f"unknown fluid_enc {cfg.fluid_enc!r}")
        self.enc_fluid = (nn.Sequential(nn.Linear(n_in, w[-1]), nn.GELU(),
                                        nn.Linear(w[-1], 2 * cfg.fluid_dim))
                          if cfg.fluid_dim else None)
        # Top-down decoder from the smallest resolution.
        self.top = nn.Parameter(torch.zeros(1, w[-1], res[-1], res[-1]))
        self.top_embed = nn.Linear(e, w[-1])
        self.dec_blocks = nn.ModuleList()
        self.dec_up = nn.ModuleList()
        for i in reversed(range(len(w))):
            r, n = res[i], max(1, cfg.blocks[i]) if res[i] in cfg.latents else cfg.blocks[i]
            blocks: list[nn.Module]
            if r in cfg.latents:
                blocks = [LatentBlock(w[i], cfg.latents[r], e, cfg.bottleneck) for _ in range(n)]
            else:
                blocks = [ResBlock(w[i], cfg.bottleneck, e) for _ in range(n)]
            self.dec_blocks.append(nn.ModuleList(blocks))
            self.dec_up.append(nn.Conv2d(w[i], w[i - 1], 1) if i > 0 else nn.Identity())
        self.out = nn.Conv2d(w[0], 1, 3, padding=1)
        if cfg.fluid_mode not in ("embed", "head"):
            raise ValueError(f"unknown fluid_mode {cfg.fluid_mode!r}")
        if cfg.fluid_head not in ("local", "multiscale"):
            raise ValueError(f"unknown fluid_head {cfg.fluid_head!r}")
        self.fluid_head = (FluidHead(w[0], cfg.fluid_dim, coords=cfg.fluid_coords,
                                     multiscale=cfg.fluid_head == "multiscale")
                           if cfg.fluid_dim and cfg.fluid_mode == "head" else None)
        for path in ("fluid_coarse", "fluid_remap"):
            if getattr(cfg, path) and self.fluid_head is None:
                raise ValueError(f"{path} needs the fluid head (fluid_dim > 0, fluid_mode head)")
        # Effusion on the coarse decoder stages, keyed by resolution (see HVAEConfig).
        self.fluid_coarse = (nn.ModuleDict({str(res[i]): CoarseFluid(w[i], cfg.fluid_dim)
                                            for i in range(len(w))
                                            if res[i] <= cfg.fluid_coarse})
                             if cfg.fluid_coarse else None)
        if cfg.fluid_remap > cfg.work_size:
            raise ValueError(f"fluid_remap {cfg.fluid_remap} exceeds the working size {cfg.work_size}")
        self.fluid_remap = (LocalRemap(w[0], cfg.fluid_dim, cfg.fluid_remap)
                            if cfg.fluid_remap else None)
        # Readout of the SCM's effusion noise from u_f: 3 side logits and the severity.
        self.fluid_readout = (nn.Linear(cfg.fluid_dim, 4)
                              if cfg.fluid_dim and cfg.fluid_aux > 0 else None)
        # (fluid_bank, fluid_dim) codes adding effusion samples from; all zero = not filled.
        self.register_buffer("fluid_codes", torch.zeros(cfg.fluid_bank, cfg.fluid_dim)
                             if cfg.fluid_dim and cfg.fluid_bank else None)

    # -- building blocks ---------------------------------------------------
    def embed(self, pa: torch.Tensor, fluid: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3)`` 0/1 parents (+ ``(B, fluid_dim)`` effusion noise) -> ``(B, E)``.

        The noise enters as ``effusion * u_f``: it can only act where effusion is present.
        Without ``fluid`` (and with ``fluid_dim > 0``) the prior mean ``u_f = 0`` is used.
        """
        pa = pa.float()
        if self.fluid_head is not None:  # effusion acts only through the fluid head
            pa = pa * pa.new_tensor([1.0, 1.0, 0.0])
        elif self.cfg.fluid_dim:
            if fluid is None:
                fluid = pa.new_zeros(pa.shape[0], self.cfg.fluid_dim)
            pa = torch.cat([pa, pa[:, 2:3] * fluid], dim=1)
        e: torch.Tensor = self.parent_embed(pa)
        return e

    def encode(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """``(B, 1, S, S)`` in [0, 1] -> encoder activations per latent resolution, and under
        key ``-1`` the coarsest activation (for the effusion-noise posterior)."""
        h = self.stem(2 * self.to_work(x) - 1)
        acts: dict[int, torch.Tensor] = {}
        for i, stage in enumerate(self.enc_blocks):
            for block in _blocks(stage):
                h = block(h)
            if h.shape[-1] in self.cfg.latents:
                acts[h.shape[-1]] = h
            if i < len(self.enc_down):
                h = self.enc_down[i](F.avg_pool2d(h, 2))
        acts[-1] = h
        return acts

    def fluid_posterior(self, acts: dict[int, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean and std ``(B, fluid_dim)`` of q(u_f | x), or None without effusion noise."""
        if self.enc_fluid is None:
            return None
        h = acts[-1]
        feats = (h.flatten(1) if self.cfg.fluid_enc == "spatial"
                 else torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1))
        loc, raw = self.enc_fluid(feats).chunk(2, 1)
        return loc, F.softplus(raw + _SOFTPLUS_ONE) + 1e-4

    def to_work(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)`` -> ``(B, 1, W, W)`` at the working size (area average)."""
        if x.shape[-1] == self.cfg.work_size:
            return x
        return F.interpolate(x, size=(self.cfg.work_size,) * 2, mode="area")

    def to_image(self, mu: torch.Tensor) -> torch.Tensor:
        """``(B, 1, W, W)`` working-size mean -> ``(B, 1, S, S)`` (bilinear)."""
        if mu.shape[-1] == self.cfg.image_size:
            return mu
        return F.interpolate(mu, size=(self.cfg.image_size,) * 2, mode="bilinear",
                             align_corners=False)

    def _top(self, e: torch.Tensor) -> torch.Tensor:
        bias: torch.Tensor = self.top_embed(e)
        return self.top.expand(e.shape[0], -1, -1, -1) + bias[:, :, None, None]

    def _up(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dec_up[i], nn.Identity):
            return h
        # 1x1 before upsampling: the same map at a quarter of the cost.
        return F.interpolate(self.dec_up[i](h), scale_factor=2, mode="nearest")

    def _coarse(self, h: torch.Tensor, pa: torch.Tensor, fluid: torch.Tensor | None,
                detach: bool = False) -> torch.Tensor:
        """``h`` (B, C, r, r) after a decoder stage, plus ``effusion * G_r(h, u_f)`` where the
        stage is coarse enough (``cfg.fluid_coarse``); ``u_f`` None: its prior mean 0.
        ``detach``: G enters as a constant (the ELBO's view, as for the fluid head)."""
        if self.fluid_coarse is None or str(h.shape[-1]) not in self.fluid_coarse:
            return h
        if fluid is None:
            fluid = h.new_zeros(h.shape[0], self.cfg.fluid_dim)
        g: torch.Tensor = self.fluid_coarse[str(h.shape[-1])](h, fluid)
        return h + pa[:, 2, None, None, None].to(h.dtype) * (g.detach() if detach else g)

    def _to_image(self, h: torch.Tensor, pa: torch.Tensor | None = None,
                  fluid: torch.Tensor | None = None, detach_fluid: bool = False,
                  xw: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder features -> mean image ``(B, 1, W, W)`` in [0, 1]; with the fluid head,
        ``effusion * F(h, u_f[, xw])`` is added before the tanh (``u_f`` None: its prior mean
        0; ``xw``: the abducted image at the working size, read by a multiscale head).
        ``detach_fluid``: F enters as a constant (no gradient to the head, h or u_f). With
        a tone re-mapping (``cfg.fluid_remap``) its change ``R(h, u_f, xw)`` joins F."""
        logits = self.out(F.gelu(h))
        if self.fluid_head is not None and pa is not None:
            if fluid is None:
                fluid = h.new_zeros(h.shape[0], self.cfg.fluid_dim)
            fl = self.fluid_head(h, fluid, xw)
            if self.fluid_remap is not None:
                if xw is None:
                    raise ValueError("a tone re-mapping needs the working-size image")
                fl = fl + self.fluid_remap(h, fluid, xw)
            logits = logits + pa[:, 2, None, None, None].float() * (fl.detach() if detach_fluid else fl)
        return (torch.tanh(logits) + 1) / 2

    # -- training -------------------------------------------------------------
    def forward(self, x: torch.Tensor, pa: torch.Tensor, beta: float | None = None
                ) -> dict[str, torch.Tensor]:
        """Negative ELBO terms in nats per pixel: ``loss``, ``nll``, ``kl``, ``mu`` (B,1,S,S)."""
        cfg = self.cfg
        beta = cfg.beta if beta is None else beta
        acts = self.encode(x)
        kl_total = x.new_zeros(())
        kl_weighted = x.new_zeros(())
        fluid = None
        # With the fluid head, u_f acts only through the head, which the ELBO takes as a
        # constant: here u_f would pay its KL for nothing (the pair loss is its likelihood).
        q_fluid = self.fluid_posterior(acts) if self.fluid_head is None else None
        if q_fluid is not None:
            f_loc, f_scale = q_fluid
            fluid = f_loc + f_scale * torch.randn_like(f_loc)
            kl_f = gaussian_kl(f_loc, f_scale, torch.zeros_like(f_loc),
                               torch.ones_like(f_scale)).sum(dim=1).mean()
            kl_total = kl_total + kl_f
            kl_weighted = kl_weighted + cfg.fluid_beta * kl_f
        e = self.embed(pa, fluid)
        h = self._top(e)
        for i, stage in enumerate(self.dec_blocks):
            for block in _blocks(stage):
                if isinstance(block, LatentBlock):
                    p_loc, p_scale, feat = block.prior_params(h, e)
                    q_loc, q_scale = block.posterior_params(h, acts[h.shape[-1]], e)
                    z = q_loc + q_scale * torch.randn_like(q_loc)
                    kl = gaussian_kl(q_loc, q_scale, p_loc, p_scale)
                    kl_sum = kl.sum(dim=(1, 2, 3)).mean()
                    if cfg.free_bits > 0:  # per channel and position, averaged over the batch
                        kl_fb = kl.mean(dim=0).clamp_min(cfg.free_bits).sum()
                    else:
                        kl_fb = kl_sum
                    weight = cfg.top_beta if h.shape[-1] <= cfg.top_res else 1.0
                    kl_total = kl_total + kl_sum
                    kl_weighted = kl_weighted + weight * kl_fb
                    h = block.step(h, z, feat, e)
                else:
                    h = block(h, e)
            h = self._up(i, self._coarse(h, pa, fluid, detach=True))
        # The ELBO takes the fluid head's output as given: the head learns only from
        # counterfactual pairs and the rest of the decoder learns to leave the fluid to it.
        # (Trained jointly, the reconstruction term held the head at zero: the latents
        # already drew the fluid, and any fluid from the head was counted twice.)
        xw = self.to_work(x)
        mu = self._to_image(h, pa, fluid, detach_fluid=True, xw=xw)
        nll = discretised_gaussian_nll(2 * xw - 1, 2 * mu - 1, cfg.sigma, cfg.bins)
        n_pix = xw[0].numel()
        nll = nll.sum(dim=(1, 2, 3)).mean() / n_pix
        return {"loss": nll + beta * kl_weighted / n_pix, "nll": nll,
                "kl": kl_total / n_pix, "mu": self.to_image(mu)}

    def cf_pair_loss(self, x: torch.Tensor, pa: torch.Tensor, x_true: torch.Tensor,
                     pa_true: torch.Tensor, fluid_labels: torch.Tensor | None = None,
                     error: str = "squared") -> torch.Tensor:
        """Counterfactual supervision from a structural causal model that renders pairs.

        ``x`` (B,1,S,S) under ``pa`` (B,3) and its true counterfactual ``x_true`` under
        ``pa_true``: abduct ``x`` (posterior means, with gradients), decode under both parent
        sets; per pair, the mean squared error of x + mu(z, pa_true) - mu(z, pa) against
        x_true at the working size divided by the identity's, |x - x_true|^2 (+ 1e-5),
        averaged over the batch (1 = no better than leaving the image unchanged, 0 = exact).
        The division gives a small local change (effusion) the same weight as a global one
        (scanner); with a plain mean the scanner pairs dominated and the cheapest answer for
        effusion was no change at all. Squared, not absolute: the sign-only gradient of an
        absolute error outside the fluid (most pixels) drowned the fluid's signal. Where the intervention adds effusion, the
        fluid noise ``u_f`` is read from ``x_true`` (the SCM shares it between the pair; a
        normal image cannot show it), so the decoder learns to place the fluid ``u_f`` names.
        ``u_f`` is drawn from its posterior and ``fluid_pair_kl`` * KL to N(0, I) is added
        (averaged over the pairs whose code is used), as in a VAE whose reconstruction term
        is the pair error. With stored codes (``fluid_bank > 0``) adding effusion draws one
        of the stored posterior means, not a N(0, I) sample, so the pairs use the posterior
        means too: the head learns on the codes it will be given (sampling noise as large as
        the differences between sides kept the head from reading them).

        ``fluid_labels`` (B, 2): the pair's SCM effusion noise (side index 0 right, 1 left,
        2 bilateral; severity), shared by both images of a pair; with ``fluid_aux > 0`` the
        readout of the used code's posterior mean is scored against it (cross-entropy of the
        side + squared error of the severity, times ``fluid_aux``).

        ``error="absolute"``: mean absolute instead of squared errors (both the model's and the
        identity's), the metric ``pcl eval-cf`` reports; the squared error's optimum is the
        conditional mean, which blurs and fades an uncertain edit, the absolute error's the
        median. For fine-tuning a model whose head already moves: from a head at zero its
        sign-only gradient outside the fluid does not train (see docs/cf_model.md).
        """
        if error not in ("squared", "absolute"):
            raise ValueError(f"unknown pair error {error!r}")
        acts = self.encode(x)
        q = self.fluid_posterior(acts)
        fluid = fluid_cf = None
        kl = aux_term = x.new_zeros(())
        if q is not None:  # reparameterised draws: the pair error is u_f's reconstruction term
            q_true = self.fluid_posterior(self.encode(x_true))
            assert q_true is not None  # both None or neither: the model has effusion noise
            add = (pa[:, 2] < 0.5) & (pa_true[:, 2] > 0.5)
            if self.cfg.fluid_bank:  # inference reads posterior means (and a bank of them):
                fluid, fluid_true = q[0], q_true[0]  # train the head on the same codes
            else:
                fluid = q[0] + q[1] * torch.randn_like(q[0])
                fluid_true = q_true[0] + q_true[1] * torch.randn_like(q_true[0])
            fluid_cf = torch.where(add[:, None], fluid_true, fluid)
            zero, one = torch.zeros_like(q[0]), torch.ones_like(q[1])
            kl_x = gaussian_kl(q[0], q[1], zero, one)  # (B, fluid_dim)
            kl_t = gaussian_kl(q_true[0], q_true[1], zero, one)
            on = add | (pa[:, 2] > 0.5)
            used = torch.where(add[:, None], kl_t, torch.where(on[:, None], kl_x, torch.zeros_like(kl_x)))
            if self.cfg.fluid_free_bits > 0:  # batch-mean KL per dimension, floored
                per_dim = used.sum(0) / on.sum().clamp_min(1)
                kl = per_dim.clamp_min(self.cfg.fluid_free_bits).sum() * on.float().mean()
            else:
                kl = used.sum(1).mean()
            if self.fluid_readout is not None and fluid_labels is not None and bool(on.any()):
                code = torch.where(add[:, None], q_true[0], q[0])[on]
                read = self.fluid_readout(code)
                labels = fluid_labels[on].to(read.dtype)
                aux = (F.cross_entropy(read[:, :3], labels[:, 0].long())
                       + (read[:, 3] - labels[:, 1]).square().mean())
                aux_term = self.cfg.fluid_aux * aux * on.float().mean()
        xw, tw = self.to_work(x), self.to_work(x_true)
        latents, mu = self._abduct_walk(acts, pa, fluid, xw)
        mu_cf = self._decode_walk(latents, pa_true, fluid_cf, self.cfg.cf_latents)
        measure = torch.square if error == "squared" else torch.abs
        err = measure(xw + mu_cf - mu - tw).mean(dim=(1, 2, 3))
        identity = measure(xw - tw).mean(dim=(1, 2, 3)).detach()
        floor = 1e-5 if error == "squared" else 3e-3  # the same faint change, sqrt(1e-5)
        return (err / (identity + floor)).mean() + self.cfg.fluid_pair_kl * kl + aux_term

    def cycle_loss(self, x: torch.Tensor, pa: torch.Tensor, pa_cf: torch.Tensor) -> torch.Tensor:
        """Reversibility of an intervention, as ``pcl eval-cf`` measures it, as a loss.

        ``x`` (B,1,S,S) under ``pa`` (B,3), intervened on to ``pa_cf`` (B,3) at the working
        size: ``x_cf = clip(x + mu(z, pa_cf) - mu(z, pa), 0, 1)``; then ``x_cf`` is abducted
        under ``pa_cf`` and intervened on back to ``pa``, ``x_back = clip(x_cf + mu(z', pa) -
        mu(z', pa_cf), 0, 1)``. Per image, the mean squared error of ``x_back`` against ``x``
        divided by that of the change itself, |x_cf - x|^2 (+ 1e-5, no gradient through the
        divisor), averaged over the batch: 0 = exactly reversible. Gradients flow through
        both abductions and all four decodes, so the forward and the backward edit learn to
        undo each other. The effusion noise is the posterior mean of each image (the parent
        that switches it on or off is not meant to change here; with it off the head is
        gated out and the code unused).
        """
        mode = self.cfg.cf_latents

        def edit(xw: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            acts = self.encode(xw)
            q = self.fluid_posterior(acts)
            fluid = q[0] if q is not None else None
            latents, mu = self._abduct_walk(acts, src, fluid, xw)
            return (xw + self._decode_walk(latents, dst, fluid, mode) - mu).clamp(0, 1)

        xw = self.to_work(x)
        x_cf = edit(xw, pa, pa_cf)
        x_back = edit(x_cf, pa_cf, pa)
        err = (x_back - xw).square().mean(dim=(1, 2, 3))
        change = (x_cf - xw).square().mean(dim=(1, 2, 3)).detach()
        return (err / (change + 1e-5)).mean()

    def _abduct_walk(self, acts: dict[int, torch.Tensor], pa: torch.Tensor,
                     fluid: torch.Tensor | None, xw: torch.Tensor | None = None
                     ) -> tuple[dict[str, Any], torch.Tensor]:
        """Posterior-mean latents ``{"z", "u"}`` (and, for a multiscale fluid head, the
        working-size image ``"xw"`` (B,1,W,W) it reads) and the working-size mean (B,1,W,W)."""
        e = self.embed(pa, fluid)
        h = self._top(e)
        zs: list[torch.Tensor] = []
        us: list[torch.Tensor] = []
        for i, stage in enumerate(self.dec_blocks):
            for block in _blocks(stage):
                if isinstance(block, LatentBlock):
                    p_loc, p_scale, feat = block.prior_params(h, e)
                    z, _ = block.posterior_params(h, acts[h.shape[-1]], e)
                    zs.append(z)
                    us.append((z - p_loc) / p_scale)
                    h = block.step(h, z, feat, e)
                else:
                    h = block(h, e)
            h = self._up(i, self._coarse(h, pa, fluid))
        latents: dict[str, Any] = {"z": zs, "u": us}
        if xw is not None and self._reads_image:
            latents["xw"] = xw
        return latents, self._to_image(h, pa, fluid, xw=latents.get("xw"))

    def _decode_walk(self, latents: dict[str, Any], pa: torch.Tensor, fluid: torch.Tensor | None,
                     mode: str) -> torch.Tensor:
        """Working-size mean (B,1,W,W) from latents under ``pa`` (see :meth:`decode_train`)."""
        if mode not in ("posterior", "prior-relative"):
            raise ValueError(f"unknown cf_latents mode {mode!r}")
        e = self.embed(pa, fluid)
        h = self._top(e)
        k = 0
        for i, stage in enumerate(self.dec_blocks):
            for block in _blocks(stage):
                if isinstance(block, LatentBlock):
                    p_loc, p_scale, feat = block.prior_params(h, e)
                    if mode == "posterior":
                        z = latents["z"][k]
                    else:
                        z = p_loc + p_scale * latents["u"][k]
                    k += 1
                    h = block.step(h, z, feat, e)
                else:
                    h = block(h, e)
            h = self._up(i, self._coarse(h, pa, fluid))
        return self._to_image(h, pa, fluid, xw=latents.get("xw"))

    @property
    def _reads_image(self) -> bool:
        return self.fluid_head is not None and (self.fluid_head.multiscale
                                                or self.fluid_remap is not None)

    # -- counterfactual inference ----------------------------------------------
    @torch.no_grad()
    def abduct(self, x: torch.Tensor, pa: torch.Tensor, fluid_seed: int = 0) -> dict[str, Any]:
        """Posterior-mean latents ``z`` and their prior-relative noise ``u`` per latent block,
        and the factual mean ``mu`` (B, 1, S, S) decoded from them.

        ``u = (z - prior_loc(pa)) / prior_scale(pa)`` is the exogenous part of ``z``; with
        ``cf_latents="prior-relative"`` an intervention keeps ``u`` and recomputes ``z`` from
        the prior under the new parents (causal-gen's counterfactual latents).

        With effusion noise (``fluid_dim > 0``) ``"fluid"`` (B, fluid_dim) is the effusion
        noise: where effusion is present (the fluid is visible) its posterior mean; where it
        is absent the image says nothing about it, so it is a draw from its prior N(0, I), and
        adding effusion draws side and severity as the data do instead of collapsing to one
        mean pattern. The draw is deterministic: seeded by ``fluid_seed`` and the image's
        content.
        """
        acts = self.encode(x)
        fluid = None
        q = self.fluid_posterior(acts)
        if q is not None:  # visible fluid: the posterior mean; none: a draw from the prior
            eps = self.fluid_draw(x, fluid_seed).to(q[0].device)
            fluid = torch.where(pa[:, 2:3] > 0.5, q[0], eps)
        latents, mu = self._abduct_walk(acts, pa, fluid, self.to_work(x))
        if fluid is not None:
            latents["fluid"] = fluid
        # The same pass gives the factual mean, saving one decode per abduction.
        latents["mu"] = self.to_image(mu)
        return latents

    def fluid_draw(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Effusion noise ``(B, fluid_dim)`` for images without effusion, seeded by ``seed``
        and each image's content: one of the stored codes (:attr:`fluid_codes`, the aggregate
        posterior of training effusions) when they are filled, else a N(0, I) draw."""
        bank = self.fluid_codes
        if bank is None or not bool(bank.abs().sum() > 0):
            return fluid_eps(x, self.cfg.fluid_dim, seed)
        rows = [bank[int(torch.randint(len(bank), (1,), generator=g))].cpu()
                for g in _image_generators(x, seed)]
        return torch.stack(rows) if rows else torch.zeros(0, self.cfg.fluid_dim)

    @torch.no_grad()
    def fill_fluid_codes(self, x: torch.Tensor, pa: torch.Tensor, seed: int = 0,
                         batch_size: int = 64) -> int:
        """Store posterior means of u_f of images ``x`` (N, 1, S, S) with effusion (``pa``
        (N, 3)) as :attr:`fluid_codes`: a seeded subset without replacement when there are more
        images than slots, all of them (repeated in turn) when fewer. Returns how many images
        the codes came from (0: no effusion images, codes left as they were)."""
        if self.fluid_codes is None or self.enc_fluid is None:
            return 0
        idx = torch.nonzero(pa[:, 2] > 0.5).flatten()
        if len(idx) == 0:
            return 0
        g = torch.Generator().manual_seed(int(seed))
        n = len(self.fluid_codes)
        idx = idx[torch.randperm(len(idx), generator=g)[:n]]
        device = self.fluid_codes.device
        locs = []
        for i in range(0, len(idx), batch_size):
            xb = x[idx[i:i + batch_size]].to(device)
            q = self.fluid_posterior(self.encode(xb))
            assert q is not None
            locs.append(q[0])
        codes = torch.cat(locs)
        self.fluid_codes.copy_(codes[torch.arange(n) % len(codes)])
        return len(codes)

    @torch.no_grad()
    def decode(self, latents: dict[str, Any], pa: torch.Tensor,
               mode: str | None = None) -> torch.Tensor:
        """No-grad :meth:`decode_train` (inference)."""
        return self.decode_train(latents, pa, mode)

    def decode_train(self, latents: dict[str, Any], pa: torch.Tensor,
                     mode: str | None = None) -> torch.Tensor:
        """Mean image ``(B, 1, S, S)`` in [0, 1] from abducted latents under parents ``pa``.

        ``mode`` (default ``cfg.cf_latents``): ``"posterior"`` decodes the abducted ``z``;
        ``"prior-relative"`` decodes ``z = prior_loc(pa) + prior_scale(pa) * u``. Under the
        factual parents both give the same image. ``latents["fluid"]`` (when present) is the
        effusion noise.
        """
        mode = mode or self.cfg.cf_latents
        return self.to_image(self._decode_walk(latents, pa, latents.get("fluid"), mode))


def _coord_grid(h: torch.Tensor) -> torch.Tensor:
    """``(1, 2, H, W)`` pixel coordinates (x, y) in [-1, 1] for features ``h`` (B, C, H, W)."""
    ramp_x = torch.linspace(-1.0, 1.0, h.shape[-1], device=h.device, dtype=h.dtype)
    ramp_y = torch.linspace(-1.0, 1.0, h.shape[-2], device=h.device, dtype=h.dtype)
    return torch.stack([ramp_x[None, :].expand(h.shape[-2], -1),
                        ramp_y[:, None].expand(-1, h.shape[-1])])[None]


def _film(y: torch.Tensor, film: nn.Linear, fluid: torch.Tensor) -> torch.Tensor:
    """``gelu(y * (1 + scale) + shift)``, ``(scale, shift)`` the ``film`` layer's reading of the
    ``(B, F)`` effusion noise: how the noise modulates the ``(B, C, H, W)`` features ``y``."""
    scale, shift = film(fluid)[:, :, None, None].chunk(2, dim=1)
    return F.gelu(y * (1 + scale) + shift)


class FluidHead(nn.Module):
    """Fluid of an effusion in pre-tanh units: ``(B, C, W, W)`` decoder features and ``(B, F)``
    effusion noise (and, when ``multiscale``, the ``(B, 1, W, W)`` working-size image) ->
    ``(B, 1, W, W)``.

    "local": two 3x3 convolutions whose hidden features are scaled and shifted by the noise
    (FiLM), so the noise can choose side and extent; ``coords`` adds the pixel coordinates
    (CoordConv). "multiscale" adds the image as an input and a branch at 1/2 and 1/4 of the
    working size (its own FiLM at the coarsest scale), so the fluid can follow the lung
    and diaphragm it sees over a whole hemithorax. Every layer a warm start lacks, and the
    last 1x1 layer, start at zero: a model warm-started from a bundle without them computes
    exactly what that bundle did, and a fresh head starts with no fluid.
    """

    def __init__(self, width: int, fluid_dim: int, hidden: int = 32, coords: bool = False,
                 multiscale: bool = False) -> None:
        super().__init__()
        self.multiscale = multiscale
        self.c1 = nn.Conv2d(width, hidden, 3, padding=1)
        # (x, y) in [-1, 1] -> hidden, added to c1 (zero at start: a warm start is unchanged)
        self.coord = nn.Conv2d(2, hidden, 1) if coords else None
        self.c2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.c3 = nn.Conv2d(hidden, 1, 1)
        self.film1 = nn.Linear(fluid_dim, 2 * hidden)
        self.film2 = nn.Linear(fluid_dim, 2 * hidden)
        _zero_(self.c3)
        if self.coord is not None:
            _zero_(self.coord)
        if multiscale:
            self.img = nn.Conv2d(1, hidden, 3, padding=1)  # the image, added to c1
            self.down1 = nn.Conv2d(hidden, hidden, 3, padding=1)  # 1/2
            self.down2 = nn.Conv2d(hidden, hidden, 3, padding=1)  # 1/4
            self.film3 = nn.Linear(fluid_dim, 2 * hidden)
            self.up1 = nn.Conv2d(hidden, hidden, 3, padding=1)  # 1/2, after the skip
            self.back = nn.Conv2d(hidden, hidden, 1)  # into the full-size path
            _zero_(self.img)
            _zero_(self.back)

    def forward(self, h: torch.Tensor, fluid: torch.Tensor,
                xw: torch.Tensor | None = None) -> torch.Tensor:
        y = self.c1(F.gelu(h))
        if self.coord is not None:
            y = y + self.coord(_coord_grid(h))
        if self.multiscale:
            if xw is None:
                raise ValueError("a multiscale fluid head needs the working-size image")
            y = y + self.img(2 * xw.to(y.dtype) - 1)
        y = _film(y, self.film1, fluid)
        if self.multiscale:
            d1 = F.gelu(self.down1(F.avg_pool2d(y, 2)))
            d2 = _film(self.down2(F.avg_pool2d(d1, 2)), self.film3, fluid)
            u1 = F.gelu(self.up1(F.interpolate(d2, scale_factor=2, mode="bilinear",
                                               align_corners=False) + d1))
            y = y + self.back(F.interpolate(u1, scale_factor=2, mode="bilinear",
                                            align_corners=False))
        y = _film(self.c2(y), self.film2, fluid)
        out: torch.Tensor = self.c3(y)
        return out


class CoarseFluid(nn.Module):
    """Effusion's change of coarse decoder features: ``(B, C, r, r)`` features and ``(B, F)``
    effusion noise -> ``(B, C, r, r)``, added to the features times the effusion parent.

    A 3x3 convolution (plus the pixel coordinates through a 1x1 one, so the noise can pick a
    side) FiLM-modulated by the noise, then a 1x1 convolution back to the stage's width that
    starts at zero: a model warm-started from a bundle without it computes what the bundle
    did.
    """

    def __init__(self, width: int, fluid_dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(width, hidden, 3, padding=1)
        self.coord = nn.Conv2d(2, hidden, 1)
        self.film = nn.Linear(fluid_dim, 2 * hidden)
        self.c2 = nn.Conv2d(hidden, width, 1)
        _zero_(self.c2)

    def forward(self, h: torch.Tensor, fluid: torch.Tensor) -> torch.Tensor:
        y = self.c1(F.gelu(h)) + self.coord(_coord_grid(h))
        out: torch.Tensor = self.c2(_film(y, self.film, fluid))
        return out


class LocalRemap(nn.Module):
    """Effusion's re-mapping of local tones, in pre-tanh units: ``(B, C, W, W)`` decoder
    features, ``(B, F)`` effusion noise and the ``(B, 1, W, W)`` working-size image ``x`` ->
    ``(B, 1, W, W)``.

    On a ``grid`` x ``grid`` partition of the image (the cells of a local contrast
    equalisation), each cell gets coefficients ``a, b, c`` from the pooled features, the
    cell's mean of ``v = 2x - 1`` and of ``v**2`` (a summary of its histogram) and the pixel
    coordinates, FiLM-modulated by the noise; the coefficients are interpolated bilinearly to
    every pixel, whose change is ``a + b v + c v**2``: a smooth field that depends on each
    pixel's own brightness, as a re-mapped tone curve does. The last layer starts at zero, so
    a model warm-started from a bundle without it computes what that bundle did. (Written by
    hand: a bilateral-grid style local curve, far smaller than any library module.)
    """

    def __init__(self, width: int, fluid_dim: int, grid: int, hidden: int = 16,
                 degree: int = 2) -> None:
        super().__init__()
        self.grid, self.degree = int(grid), int(degree)
        self.c1 = nn.Conv2d(width + 2, hidden, 3, padding=1)
        self.coord = nn.Conv2d(2, hidden, 1)
        self.film = nn.Linear(fluid_dim, 2 * hidden)
        self.c2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.c3 = nn.Conv2d(hidden, degree + 1, 1)
        _zero_(self.c3)

    def forward(self, h: torch.Tensor, fluid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        v = 2 * x.to(h.dtype) - 1
        cells = F.adaptive_avg_pool2d(torch.cat([F.gelu(h), v, v * v], 1), self.grid)
        y = self.c1(cells) + self.coord(_coord_grid(cells))
        y = F.gelu(self.c2(_film(y, self.film, fluid)))
        coef = F.interpolate(self.c3(y), size=v.shape[-2:], mode="bilinear", align_corners=False)
        powers = torch.cat([v.pow(k) for k in range(self.degree + 1)], 1)
        out: torch.Tensor = (coef * powers).sum(1, keepdim=True)
        return out


def _image_generators(x: torch.Tensor, seed: int = 0) -> list[torch.Generator]:
    """One generator per image of ``x`` (B, 1, S, S), seeded by ``seed`` and the image's
    content (16-bit quantised), so the same scan always gets the same draws."""
    q = (x.detach().float().clamp(0, 1) * 65535).round().to(torch.int32).cpu().numpy()
    return [torch.Generator().manual_seed(zlib.crc32(q[b].tobytes()) * 1000003 + int(seed))
            for b in range(x.shape[0])]


def fluid_eps(x: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal draws ``(B, dim)``, one per image, seeded by ``seed`` and the image's
    content, so the same scan always gets the same draw."""
    rows = [torch.randn(dim, generator=g) for g in _image_generators(x, seed)]
    return torch.stack(rows) if rows else torch.zeros(0, dim)


def build_hvae(preset_or_cfg: str | HVAEConfig) -> HVAE:
    """The one factory: a preset name or a config -> :class:`HVAE`."""
    cfg = preset_or_cfg if isinstance(preset_or_cfg, HVAEConfig) else HVAEConfig.for_preset(preset_or_cfg)
    return HVAE(cfg)


def build_from_config(config: dict[str, Any]) -> HVAE:
    """Bundle builder: ``{"hvae": HVAEConfig dict}``."""
    return HVAE(HVAEConfig.from_dict(config["hvae"]))
