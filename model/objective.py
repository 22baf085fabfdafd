"""The training objective: KL warm-up, KL balancing, regularization coefficients, and the loss itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.config import NVAEConfig
from model.layers import shared_effective_weights


def kl_warmup_beta(
    step: int,
    total_steps: int,
    anneal_portion: float = 0.3,
    const_portion: float = 1e-4,
    min_beta: float = 1e-4,
) -> float:
    """KL coefficient beta at `step`: held at `min_beta`, then linear to 1 over `anneal_portion` of training."""
    anneal = max(anneal_portion * total_steps, 1e-8)
    const = const_portion * total_steps
    return max(min((step - const) / anneal, 1.0), min_beta)


def kl_balance_alphas(groups_fine_to_coarse: list[int]) -> torch.Tensor:
    """Per-group balancing alphas, coarse to fine: `4**i / groups_in_scale(i)`, normalised to min 1.

    i = 0 is the coarsest scale. For [10, 5] (MNIST): [1]*5 + [2]*10.
    """
    n = len(groups_fine_to_coarse)
    parts = []
    for i in range(n):
        g = groups_fine_to_coarse[n - 1 - i]
        parts.append(torch.full((g,), 4.0**i / g))
    alphas = torch.cat(parts)
    return alphas / alphas.min()


def balanced_kl(
    kl_all: list[torch.Tensor], beta: float, alphas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """beta-weighted KL per image (B,), with KL balancing while beta < 1; also the group coefficients (G,).

    Balancing: `c_g = (mean_batch |KL_g| + 0.01) / alpha_g`, normalised to mean 1 and detached.
    """
    kl = torch.stack(kl_all, dim=1)  # (B, G)
    if beta < 1.0:
        c = (kl.abs().mean(dim=0) + 0.01) / alphas.to(kl.device)
        c = (c / c.mean()).detach()
    else:
        c = torch.ones(kl.size(1), device=kl.device)
    return beta * (kl * c).sum(dim=1), c


def regularization_lambda(cfg: NVAEConfig, beta: float) -> float:
    """Spectral/BN coefficient: constant, or log-linear from `sr_lambda_init` (beta=0) to `sr_lambda` (beta=1)."""
    if not cfg.sr_anneal:
        return cfg.sr_lambda
    return math.exp((1.0 - beta) * math.log(cfg.sr_lambda_init) + beta * math.log(cfg.sr_lambda))


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to minimise
    nelbo: torch.Tensor  # (B,) recon + plain KL, nats
    recon: torch.Tensor  # (B,)
    kl: torch.Tensor  # (B,) unweighted total KL
    kl_groups: torch.Tensor  # (G,) batch-mean KL per group
    kl_coeffs: torch.Tensor  # (G,)
    beta: float
    lam: float
    spectral: torch.Tensor
    bn: torch.Tensor


def nvae_loss(model, x: torch.Tensor, step: int, total_steps: int, alphas: torch.Tensor) -> LossTerms:
    """One training objective evaluation on a batch x (B, C, D, D) in [0, 1]."""
    cfg = model.cfg
    with shared_effective_weights(model):
        out = model(x)
        spectral = model.spectral_loss()
    recon = model.reconstruction_nll(out.logits, x)
    beta = kl_warmup_beta(step, total_steps, cfg.kl_anneal_portion, cfg.kl_const_portion, cfg.kl_const_coeff)
    weighted_kl, coeffs = balanced_kl(out.kl_all, beta, alphas)
    lam = regularization_lambda(cfg, beta)
    bn = model.bn_loss()
    loss = (recon + weighted_kl).mean() + lam * (spectral + bn)
    kl_stack = torch.stack(out.kl_all, dim=1)
    kl_stack = kl_stack.detach()
    kl, recon = kl_stack.sum(1), recon.detach()
    return LossTerms(
        loss,
        recon + kl,
        recon,
        kl,
        kl_stack.mean(0),
        coeffs,
        beta,
        lam,
        spectral.detach(),
        bn.detach(),
    )
