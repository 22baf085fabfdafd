"""Distributions: soft-clamped Normal (latents), discretized logistic mixture and Bernoulli (pixels).

Everything here computes in float32, whatever precision the network ran in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.errors import ConfigError

LOG_2PI = math.log(2 * math.pi)


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """Differentiable clamp to (-bound, bound): `bound * tanh(x / bound)`."""
    return bound * torch.tanh(x / bound)


class Normal:
    """Diagonal Normal with soft-clamped parameters: `mu = 5 tanh(mu/5)`, `sigma = exp(5 tanh(ls/5)) + 0.01`.

    `temperature` multiplies sigma (floor included). Tensors are (B, Z, H, W).
    """

    def __init__(self, mu: torch.Tensor, log_sigma: torch.Tensor, temperature: float = 1.0):
        self.mu = soft_clamp(mu.float())
        self.sigma = (torch.exp(soft_clamp(log_sigma.float())) + 1e-2) * temperature

    @classmethod
    def residual(cls, mu_p, log_sigma_p, d_mu, d_log_sigma) -> Normal:
        """Residual posterior (Eq. 2): raw heads are added, then clamped: N(mu_p + dmu, logsig_p + dlogsig)."""
        return cls(mu_p.float() + d_mu.float(), log_sigma_p.float() + d_log_sigma.float())

    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample `mu + sigma * eps`; eps ~ N(0, I) unless given."""
        if eps is None:
            eps = torch.randn_like(self.mu)
        return self.mu + self.sigma * eps

    def log_p(self, z: torch.Tensor) -> torch.Tensor:
        """Elementwise log density, same shape as z."""
        n = (z - self.mu) / self.sigma
        return -0.5 * n * n - 0.5 * LOG_2PI - torch.log(self.sigma)

    def kl(self, other: Normal) -> torch.Tensor:
        """Analytic elementwise KL(self || other)."""
        term1 = (self.mu - other.mu) / other.sigma
        ratio = self.sigma / other.sigma
        return 0.5 * (term1 * term1 + ratio * ratio) - 0.5 - torch.log(ratio)


class Bernoulli:
    """Pixelwise Bernoulli over binarized images; logits (B, C, H, W)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits.float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of x in {0,1} (B, C, H, W), summed over channels: (B, H, W)."""
        return -F.binary_cross_entropy_with_logits(self.logits, x.float(), reduction="none").sum(1)

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(self.logits.shape, generator=generator, device=self.logits.device)
        return self.sample_from_uniform(u, temperature)

    def sample_from_uniform(self, u_pix: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """`sample` with its uniform draw u_pix (B, C, H, W) given (temperature does not apply to pixels)."""
        return (u_pix < torch.sigmoid(self.logits)).float()


class DiscretizedLogisticMixture:
    """Discretized mixture of logistics with PixelCNN++ channel coupling, for C-channel images.

    Parameter layout of (B, M*(1 + 2C + C(C-1)/2), H, W): M mixture logits, C*M means, C*M log-scales
    (clamped >= -7), C(C-1)/2*M coupling coefficients (tanh). Channel c's mean is shifted by
    `sum_{j<c} coeff[c,j] * x_j`. Data x in [0,1] holds `2**num_bits` levels.

    `edge="correct"` gives the top bin everything above the midpoint of the two largest levels; `"released"`
    reproduces the authors' `x > 0.99` test (in [-1,1]), which at 8 bits also gives level 254 the mass of
    the whole upper tail, an optimistic bias.
    """

    def __init__(
        self, params: torch.Tensor, channels: int, num_mix: int, num_bits: int = 8, edge: str = "correct"
    ):
        if edge not in ("correct", "released"):
            raise ConfigError(f"edge must be 'correct' or 'released', got {edge!r}")
        params = params.float()
        b, _, h, w = params.shape
        m, c = num_mix, channels
        n_coef = c * (c - 1) // 2
        expected = m * (1 + 2 * c + n_coef)
        if params.size(1) != expected:
            raise ValueError(f"DMoL with C={c}, M={m} needs {expected} channels, got {params.size(1)}")
        self.channels, self.num_mix = c, m
        self.logit_probs = params[:, :m]  # (B, M, H, W)
        self.means = params[:, m : m + c * m].reshape(b, c, m, h, w)
        self.log_scales = params[:, m + c * m : m + 2 * c * m].reshape(b, c, m, h, w).clamp(min=-7.0)
        self.coeffs = torch.tanh(params[:, m + 2 * c * m :].reshape(b, n_coef, m, h, w))
        self.max_val = 2.0**num_bits - 1
        self.edge = edge

    @staticmethod
    def _pair(c: int, j: int) -> int:
        return c * (c - 1) // 2 + j

    def _coupled_means(self, xs: torch.Tensor) -> torch.Tensor:
        """Means after channel coupling; xs (B, C, 1, H, W) in [-1, 1] -> (B, C, M, H, W)."""
        means = []
        for c in range(self.channels):
            mean = self.means[:, c]
            for j in range(c):
                mean = mean + self.coeffs[:, self._pair(c, j)] * xs[:, j]
            means.append(mean)
        return torch.stack(means, dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probability of each pixel's C values; x (B, C, H, W) in [0, 1] -> (B, H, W)."""
        xs = (2 * x.float() - 1).unsqueeze(2)  # (B, C, 1, H, W)
        centered = xs - self._coupled_means(xs)
        inv_s = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.max_val
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # bottom bin: log sigmoid(plus_in)
        log_one_minus_cdf_min = -F.softplus(min_in)  # top bin: log (1 - sigmoid(min_in))
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in)
        log_mid = torch.where(
            cdf_delta > 1e-5,
            torch.log(torch.clamp(cdf_delta, min=1e-10)),
            log_pdf_mid - math.log(self.max_val / 2),
        )
        top = 0.99 if self.edge == "released" else 1.0 - half_bin
        log_probs = torch.where(
            xs < -1.0 + half_bin, log_cdf_plus, torch.where(xs > top, log_one_minus_cdf_min, log_mid)
        )
        log_probs = log_probs.sum(1) + F.log_softmax(self.logit_probs, dim=1)  # (B, M, H, W)
        return torch.logsumexp(log_probs, dim=1)

    def sample(self, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw images (B, C, H, W) in [0, 1] (continuous values; quantise with `quantize`)."""
        device = self.logit_probs.device
        u_mix = torch.rand(self.logit_probs.shape, generator=generator, device=device)
        u_pix = torch.rand(self.means[:, :, 0].shape, generator=generator, device=device)
        return self.sample_from_uniform(u_mix, u_pix, temperature)

    def sample_from_uniform(self, u_mix: torch.Tensor, u_pix: torch.Tensor, temperature) -> torch.Tensor:
        """`sample` with its uniform draws given: u_mix (B, M, H, W) picks the component (Gumbel-max),
        u_pix (B, C, H, W) the logistic value. Only exportable ops (no one-hot, no random)."""
        gumbel = -torch.log(-torch.log(u_mix.clamp(1e-5, 1 - 1e-5)))
        index = torch.argmax(self.logit_probs / temperature + gumbel, 1, keepdim=True)  # (B, 1, H, W)
        components = torch.arange(self.num_mix, device=index.device).view(1, -1, 1, 1)
        sel = (index == components).float().unsqueeze(1)  # one-hot (B, 1, M, H, W)
        means = (self.means * sel).sum(2)
        log_scales = (self.log_scales * sel).sum(2)
        coeffs = (self.coeffs * sel).sum(2)
        u = u_pix.clamp(1e-5, 1 - 1e-5)
        x = means + torch.exp(log_scales) * temperature * (torch.log(u) - torch.log1p(-u))
        return self._couple_and_clamp(x, coeffs)

    def mean(self) -> torch.Tensor:
        """Mixture-weighted mean image (B, C, H, W) in [0, 1], coupling applied channel by channel."""
        probs = F.softmax(self.logit_probs, dim=1).unsqueeze(1)  # (B, 1, M, H, W)
        outs: list[torch.Tensor] = []
        for c in range(self.channels):
            mean = self.means[:, c]
            for j in range(c):
                mean = mean + self.coeffs[:, self._pair(c, j)] * outs[j].unsqueeze(1)
            outs.append(torch.clamp((mean * probs[:, 0]).sum(1), -1, 1))
        return torch.stack(outs, dim=1) / 2 + 0.5

    def _couple_and_clamp(self, x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for c in range(self.channels):
            v = x[:, c]
            for j in range(c):
                v = v + coeffs[:, self._pair(c, j)] * outs[j]
            outs.append(torch.clamp(v, -1.0, 1.0))
        return torch.stack(outs, dim=1) / 2 + 0.5


def quantize(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Round [0,1] values to the nearest of 2**num_bits levels (still in [0,1])."""
    levels = 2**num_bits - 1
    return torch.round(x.clamp(0, 1) * levels) / levels
