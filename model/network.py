"""The NVAE network: stem, preprocess, bidirectional encoder, top-down decoder, postprocess, likelihood head.

Naming follows the paper: the decoder walks latent groups from the coarsest scale to the finest; group 0 has
a fixed N(0, I) prior, every later group a prior computed from the decoder state, and a residual posterior
computed from the encoder feature of that group combined with the decoder state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.cells import DecoderCell, DecoderCombiner, EncoderCell, EncoderCombiner
from model.config import NVAEConfig
from model.distributions import Bernoulli, DiscretizedLogisticMixture, Normal
from model.flows import FlowPair
from model.layers import ELU, WNConv2d
from model.regularizers import SpectralRegularizer, bn_regularization


@dataclass
class ForwardOutput:
    """What one encoder+decoder pass gives.

    logits: decoder head (B, output_channels, S, S). log_q, log_p: (B,) summed over all latents.
    kl_all: per group (B,), coarse to fine. kl_diag: per group (Z,) mean KL per latent channel.
    """

    logits: torch.Tensor
    log_q: torch.Tensor
    log_p: torch.Tensor
    kl_all: list[torch.Tensor]
    kl_diag: list[torch.Tensor]


class NVAE(nn.Module):
    """NVAE (Vahdat & Kautz, 2020) built from a validated `NVAEConfig`."""

    def __init__(self, cfg: NVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        c, z = cfg.channels, cfg.z_channels
        fused = cfg.fused_bn_swish
        gps = cfg.groups_per_scale  # fine to coarse
        self.groups_fine_to_coarse = gps
        # (scale index coarse-first, group index) for every latent group in decoder order
        self.group_scales = [s for s in range(cfg.num_scales) for _ in range(gps[cfg.num_scales - 1 - s])]

        self.stem = WNConv2d(cfg.in_channels, c, 3, padding=1, bias=True)

        # Preprocess: the last cell of each block halves the resolution and doubles the channels.
        mult = 1
        pre: list[nn.Module] = []
        for _ in range(cfg.pre_blocks):
            for i in range(cfg.pre_cells):
                if i == cfg.pre_cells - 1:
                    pre.append(EncoderCell(c * mult, 2 * c * mult, down=True, fused_bn_swish=fused))
                    mult *= 2
                else:
                    pre.append(EncoderCell(c * mult, c * mult, fused_bn_swish=fused))
        self.preprocess = nn.Sequential(*pre)

        # Encoder tower, finest scale first: per group `cells_enc` cells; a combiner after every group but
        # the top one; a down cell between scales.
        self.enc_groups = nn.ModuleList()
        self.enc_combiners = nn.ModuleList()
        self.enc_down = nn.ModuleList()
        for s in range(cfg.num_scales):
            for g in range(gps[s]):
                width = c * mult
                self.enc_groups.append(
                    nn.Sequential(
                        *[EncoderCell(width, width, fused_bn_swish=fused) for _ in range(cfg.cells_enc)]
                    )
                )
                if not (s == cfg.num_scales - 1 and g == gps[s] - 1):
                    self.enc_combiners.append(EncoderCombiner(width, width))
            if s < cfg.num_scales - 1:
                self.enc_down.append(EncoderCell(c * mult, 2 * c * mult, down=True, fused_bn_swish=fused))
                mult *= 2
        top_mult = mult

        width = c * top_mult
        self.enc0 = nn.Sequential(ELU(), WNConv2d(width, width, 1, bias=True), ELU())

        # Learned decoder input h at the coarsest latent resolution.
        side = cfg.image_size // cfg.total_downsample
        self.h = nn.Parameter(torch.rand(c * top_mult, side, side))

        # Samplers and flows per group, coarse first.
        self.enc_sampler = nn.ModuleList()
        self.dec_sampler = nn.ModuleList()
        self.flows = nn.ModuleList()
        m = top_mult
        for s in range(cfg.num_scales):
            for g in range(gps[cfg.num_scales - 1 - s]):
                self.enc_sampler.append(WNConv2d(c * m, 2 * z, 3, padding=1, bias=True))
                self.flows.append(nn.ModuleList(FlowPair(z) for _ in range(cfg.num_nf)))
                if not (s == 0 and g == 0):
                    self.dec_sampler.append(nn.Sequential(ELU(), WNConv2d(c * m, 2 * z, 1, bias=True)))
            m //= 2

        # Decoder tower, coarsest scale first: group 0 only a combiner, later groups `cells_dec` cells then
        # a combiner; an up cell between scales.
        self.dec_groups = nn.ModuleList()
        self.dec_combiners = nn.ModuleList()
        self.dec_up = nn.ModuleList()
        m = top_mult
        for s in range(cfg.num_scales):
            for g in range(gps[cfg.num_scales - 1 - s]):
                width = c * m
                n_cells = 0 if (s == 0 and g == 0) else cfg.cells_dec
                self.dec_groups.append(
                    nn.Sequential(
                        *[DecoderCell(width, width, 6, fused_bn_swish=fused) for _ in range(n_cells)]
                    )
                )
                self.dec_combiners.append(DecoderCombiner(width, z))
            if s < cfg.num_scales - 1:
                self.dec_up.append(DecoderCell(c * m, c * m // 2, 6, up=True, fused_bn_swish=fused))
                m //= 2

        # Postprocess: the first cell of each block doubles the resolution and halves the channels.
        post: list[nn.Module] = []
        for _ in range(cfg.post_blocks):
            for i in range(cfg.post_cells):
                if i == 0:
                    post.append(DecoderCell(c * m, c * m // 2, 3, up=True, fused_bn_swish=fused))
                    m //= 2
                else:
                    post.append(DecoderCell(c * m, c * m, 3, fused_bn_swish=fused))
        self.postprocess = nn.Sequential(*post)
        self.head = nn.Sequential(ELU(), WNConv2d(c * m, cfg.output_channels, 3, padding=1, bias=True))

        self.spectral = SpectralRegularizer(self)

    # ------------------------------------------------------------------ shapes
    @property
    def num_groups(self) -> int:
        return len(self.group_scales)

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(Z, H, W) of every latent group, coarse to fine."""
        side = self.cfg.image_size // self.cfg.total_downsample
        return [(self.cfg.z_channels, side * 2**s, side * 2**s) for s in self.group_scales]

    # ------------------------------------------------------------------ passes
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.pad
        return F.pad(x, (p, p, p, p)) if p else x

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """Crop a (.., S, S) network-sized tensor back to the data size."""
        p = self.cfg.pad
        return t[..., p : p + self.cfg.data_size, p : p + self.cfg.data_size] if p else t

    def encode_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottom-up pass. x (B, C, D, D) in [0,1] -> top feature and the per-group features, coarse first."""
        s = self.stem(2 * self._pad(x) - 1.0)
        s = self.preprocess(s)
        feats = []
        k = 0
        for scale in range(self.cfg.num_scales):
            for _ in range(self.groups_fine_to_coarse[scale]):
                s = self.enc_groups[k](s)
                if k < len(self.enc_combiners):
                    feats.append(s)
                k += 1
            if scale < self.cfg.num_scales - 1:
                s = self.enc_down[scale](s)
        feats.reverse()
        return self.enc0(s), feats

    def _initial_state(self, batch: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        s = self.h.unsqueeze(0).expand(batch, -1, -1, -1)
        return s if dtype is None else s.to(dtype)

    def _decode(self, batch: int, dtype: torch.dtype | None, pick_z) -> torch.Tensor:
        """Top-down pass from `h`: per group j, run its cells, then `z = pick_z(j, s)` and combine.

        Returns head logits (B, out, S, S). `pick_z` sees the decoder state s (B, C, H, W) of group j.
        """
        s = self._initial_state(batch, dtype)
        up = iter(self.dec_up)
        for j, scale in enumerate(self.group_scales):
            if j > 0 and scale != self.group_scales[j - 1]:
                s = next(up)(s)
            if len(self.dec_groups[j]):  # group 0 has no cells
                s = self.dec_groups[j](s)
            s = self.dec_combiners[j](s, pick_z(j, s))
        return self.head(self.postprocess(s))

    def forward(self, x: torch.Tensor, eps: list[torch.Tensor] | None = None) -> ForwardOutput:
        """Encode x (B, C, D, D) in [0,1], sample every group's posterior, decode. `eps`: optional noise."""
        top, feats = self.encode_features(x)
        log_q = log_p = 0.0
        kl_all, kl_diag = [], []

        def posterior_z(j: int, s: torch.Tensor) -> torch.Tensor:
            nonlocal log_q, log_p
            if j == 0:
                mu_q, ls_q = self.enc_sampler[0](top).chunk(2, dim=1)
                q = Normal(mu_q, ls_q)
                p = Normal(torch.zeros_like(q.mu), torch.zeros_like(q.mu))
            else:
                mu_p, ls_p = self.dec_sampler[j - 1](s).chunk(2, dim=1)
                # combiners were built finest first; the decoder meets them coarsest first
                combiner = self.enc_combiners[len(self.enc_combiners) - j]
                mu_q, ls_q = self.enc_sampler[j](combiner(feats[j - 1], s)).chunk(2, dim=1)
                q = Normal.residual(mu_p, ls_p, mu_q, ls_q) if self.cfg.res_dist else Normal(mu_q, ls_q)
                p = Normal(mu_p, ls_p)
            z = q.sample(None if eps is None else eps[j])
            lq = q.log_p(z)
            for flow in self.flows[j]:
                z = flow(z)  # volume preserving: log q is unchanged
            lp = p.log_p(z)
            kl = lq - lp if self.cfg.num_nf > 0 else q.kl(p)
            kl_all.append(kl.sum(dim=(1, 2, 3)))
            kl_diag.append(kl.sum(dim=(2, 3)).mean(0))
            log_q = log_q + lq.sum(dim=(1, 2, 3))
            log_p = log_p + lp.sum(dim=(1, 2, 3))
            return z

        logits = self._decode(x.size(0), top.dtype, posterior_z)
        return ForwardOutput(logits, log_q, log_p, kl_all, kl_diag)

    @torch.no_grad()
    def sample_logits(
        self,
        num: int,
        temperature: float | torch.Tensor = 1.0,
        eps: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from the prior at `temperature`; returns head logits (B, out, S, S).

        `eps`: standard-normal noise per group (coarse first), drawn from `generator` if not given.
        """
        device = self.h.device
        if eps is None:
            eps = [
                torch.randn((num, *shape), generator=generator, device=device)
                for shape in self.latent_shapes()
            ]

        def prior_z(j: int, s: torch.Tensor) -> torch.Tensor:
            if j == 0:
                zeros = torch.zeros_like(eps[0])
                return Normal(zeros, zeros, temperature).sample(eps[0])
            mu_p, ls_p = self.dec_sampler[j - 1](s).chunk(2, dim=1)
            return Normal(mu_p, ls_p, temperature).sample(eps[j])

        return self._decode(num, None, prior_z)

    # ------------------------------------------------------------------ likelihood
    def output_distribution(self, logits: torch.Tensor):
        """The pixel distribution for head logits (network-sized, uncropped)."""
        cfg = self.cfg
        if cfg.likelihood == "bernoulli":
            return Bernoulli(logits)
        return DiscretizedLogisticMixture(logits, cfg.in_channels, cfg.num_mix, cfg.num_bits, cfg.dmol_edge)

    def reconstruction_nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x|z) in nats per image (B,), over the data-sized (cropped) pixels."""
        log_px = self.output_distribution(logits).log_prob(self._pad(x))  # (B, S, S)
        return -self.crop(log_px).sum(dim=(1, 2))

    # ------------------------------------------------------------------ regularizers
    def spectral_loss(self) -> torch.Tensor:
        """Sum of the largest singular values of every conv weight (power iteration, persistent u, v)."""
        return self.spectral(self)

    def bn_loss(self) -> torch.Tensor:
        return bn_regularization(self)
