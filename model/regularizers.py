"""Spectral regularization (paper Sec. 3.2) and the BN max-|gamma| regularization of the released recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every conv layer in module order (depthwise, 1x1 and masked ones included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _weight_matrix(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.effective_weight() if hasattr(conv, "effective_weight") else conv.weight
    return w.reshape(w.size(0), -1)


class _BilinearForm(torch.autograd.Function):
    """u^T W v for W (rows, cols) and constant u (rows,), v (cols,) -> a scalar; or stacked, W (L, rows, cols),
    u (L, rows), v (L, cols) -> (L,).

    Saves only u and v; the backward's outer products are one broadcast multiply, where autograd's bmm form
    would compute them as a K = 1 batched matmul, a slow way to form an outer product.
    """

    @staticmethod
    def forward(ctx, w, u, v):
        ctx.save_for_backward(u, v)
        return torch.matmul(u.unsqueeze(-2), torch.matmul(w, v.unsqueeze(-1))).reshape(u.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        return grad.reshape(*u.shape[:-1], 1, 1) * u.unsqueeze(-1) * v.unsqueeze(-2), None, None


def _matrix_view(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`w` (C_out, C_in, k, k) as a (C_out, C_in*k*k) matrix without a copy, and whether its columns are in
    (k, k, C_in) order: a channels-last weight is viewed in its memory order, which permutes the columns
    (the singular values, and u, stay; v is permuted the same way, see `_v_to`)."""
    o = w.size(0)
    if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return w.permute(0, 2, 3, 1).reshape(o, -1), True
    return w.reshape(o, -1), False


def _v_to(v: torch.Tensor, shape: torch.Size, memory_order: bool) -> torch.Tensor:
    """v from (C_in, k, k) column order to the (k, k, C_in) memory order of a channels-last weight, or back."""
    c, kh, kw = shape[1:]
    if memory_order:
        return v.view(c, kh, kw).permute(1, 2, 0).reshape(-1)
    return v.view(kh, kw, c).permute(2, 0, 1).reshape(-1)


class SpectralRegularizer(nn.Module):
    """Sum over conv layers of the largest singular value of the weight reshaped to (C_out, rest).

    The singular vector estimates are buffers, one pair per matrix shape (`u_k` (L, rows), `v_k` (L, cols) for
    the L layers of that shape), so they persist across steps and checkpoints: `iters_first` iterations the
    first time, `iters` after. Each layer runs its iterations on its own weight, viewed in place as a matrix
    (no copy), so the weight stays in cache for all its matrix-vector products; a stack of all layers of a
    shape would be a copy, streamed from memory for each product.
    """

    def __init__(self, model: nn.Module, iters: int | None = None, iters_first: int | None = None):
        super().__init__()
        cfg = getattr(model, "cfg", None)
        self.iters = iters or (cfg.sr_iters if cfg is not None else 4)
        self.iters_first = iters_first or (cfg.sr_iters_first if cfg is not None else 40)
        groups: dict[tuple[int, int], list[str]] = {}
        for name, conv in conv_layers(model):
            rows = conv.weight.size(0)
            cols = conv.weight[0].numel()
            groups.setdefault((rows, cols), []).append(name)
        self.group_names = list(groups.values())
        for k, ((rows, cols), names) in enumerate(groups.items()):
            self.register_buffer(f"u_{k}", F.normalize(torch.randn(len(names), rows), dim=1, eps=1e-3))
            self.register_buffer(f"v_{k}", F.normalize(torch.randn(len(names), cols), dim=1, eps=1e-3))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, model: nn.Module) -> torch.Tensor:
        """The regularization term (a scalar with gradients to every conv weight)."""
        modules = dict(model.named_modules())
        first = not bool(self.initialized)
        n_iter = self.iters_first if first else self.iters
        total = None
        for k, names in enumerate(self.group_names):
            u_all, v_all = getattr(self, f"u_{k}"), getattr(self, f"v_{k}")
            for i, name in enumerate(names):
                sigma = self._one_layer(n_iter, modules[name], u_all[i], v_all[i])
                total = sigma if total is None else total + sigma
        self.initialized.fill_(True)
        return total if total is not None else torch.zeros(())

    @staticmethod
    def _one_layer(n_iter: int, conv: nn.Conv2d, u_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        """sigma of one layer's weight after `n_iter` power iterations, which update `u_buf`, `v_buf`."""
        w = conv.effective_weight() if hasattr(conv, "effective_weight") else conv.weight
        wm, memory_order = _matrix_view(w.to(u_buf.dtype))  # the buffers' precision (float32 under autocast)
        with torch.no_grad():
            wd, u = wm.detach(), u_buf
            v = _v_to(v_buf, w.shape, True) if memory_order else v_buf
            for _ in range(n_iter):
                v = F.normalize(u @ wd, dim=0, eps=1e-3)
                u = F.normalize(wd @ v, dim=0, eps=1e-3)
            u_buf.copy_(u)
            v_buf.copy_(_v_to(v, w.shape, False) if memory_order else v)
        return _BilinearForm.apply(wm, u.clone(), v.clone())

    @torch.no_grad()
    def singular_values(self, model: nn.Module) -> dict[str, float]:
        """Current estimate of each layer's largest singular value, by name (no iteration)."""
        modules = dict(model.named_modules())
        out = {}
        for k, names in enumerate(self.group_names):
            u, v = getattr(self, f"u_{k}"), getattr(self, f"v_{k}")
            w = torch.stack([_weight_matrix(modules[n]) for n in names]).to(u.dtype)
            sig = torch.bmm(u.unsqueeze(1), torch.bmm(w, v.unsqueeze(2))).flatten()
            out.update({n: float(s) for n, s in zip(names, sig, strict=True)})
        return out


def bn_regularization(model: nn.Module) -> torch.Tensor:
    """Sum over BN layers of max |gamma| (keeps BN from undoing the spectral regularization)."""
    terms = [m.weight.abs().max() for m in bn_layers(model) if m.affine]
    return torch.stack(terms).sum() if terms else torch.zeros(())
