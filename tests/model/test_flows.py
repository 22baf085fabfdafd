import pytest
import torch
from torch.autograd.functional import jacobian

from model.flows import FlowCell, FlowPair, ar_mask


def _order(z_ch, side, mirror):
    """Index of every (c, h, w) element in the autoregressive order: raster (reversed if mirrored), channel."""
    idx = torch.zeros(z_ch, side, side, dtype=torch.long)
    for h in range(side):
        for w in range(side):
            pos = h * side + w
            if mirror:
                pos = side * side - 1 - pos
            for c in range(z_ch):
                idx[c, h, w] = pos * z_ch + c
    return idx.flatten()


def _randomize(module):
    # trained weights are not tiny: make every unmasked tap matter
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 1)


@pytest.mark.parametrize("mirror", [False, True])
def test_flow_cell_jacobian_is_triangular_with_unit_diagonal(mirror):
    """dz'/dz is I minus a strictly lower-triangular matrix in the autoregressive order (log-det 0)."""
    torch.manual_seed(0)
    z_ch, side = 3, 4
    cell = FlowCell(z_ch, mirror=mirror).double()
    _randomize(cell)
    z = torch.randn(1, z_ch, side, side, dtype=torch.float64)
    jac = jacobian(lambda t: cell(t.view(1, z_ch, side, side)).flatten(), z.flatten())
    order = _order(z_ch, side, mirror)
    perm = torch.argsort(order)
    j = jac[perm][:, perm]  # rows/cols in autoregressive order
    shift_jac = torch.eye(j.size(0), dtype=j.dtype) - j
    assert torch.count_nonzero(torch.triu(shift_jac)) == 0  # strictly lower triangular
    assert torch.count_nonzero(torch.tril(shift_jac, -1)) > 0  # and it does depend on earlier elements
    assert torch.allclose(torch.diagonal(j), torch.ones(j.size(0), dtype=j.dtype))


def test_pair_depends_on_all_positions_and_preserves_volume():
    torch.manual_seed(0)
    pair = FlowPair(2).double()
    _randomize(pair)
    z = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    jac = jacobian(lambda t: pair(t.view(1, 2, 3, 3)).flatten(), z.flatten())
    assert torch.linalg.det(jac).item() == pytest.approx(1.0, abs=1e-8)
    # the first element in raster order is influenced by later ones through the mirrored cell
    assert jac[0].abs()[1:].sum() > 0


def test_mask_centre_tap_channel_structure():
    m = ar_mask(2, 4, 3, 1, zero_diag=True, mirror=False)[:, :, 1, 1]
    assert m.tolist() == [[0, 0], [0, 0], [1, 0], [1, 0]]
    m = ar_mask(4, 2, 1, 1, zero_diag=False, mirror=False)[:, :, 0, 0]
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_shift_starts_small():
    torch.manual_seed(0)
    cell = FlowCell(4, mirror=False)
    z = torch.randn(8, 4, 6, 6)
    assert (cell(z) - z).abs().mean() < 0.5 * z.abs().mean()


@pytest.mark.parametrize("mirror", [False, True])
def test_output_conv_starts_with_the_authors_gain_and_an_untouched_direction(mirror):
    """Authors' ELUConv(weight_init_coeff=0.1): log_g = log(||v * mask|| + 0.01) + log 0.1, v at PyTorch's
    default init (kaiming-uniform bound 1/sqrt(fan_in)); not v scaled by 0.1."""
    import math

    torch.manual_seed(0)
    cell = FlowCell(4, mirror=mirror)
    conv = cell.shift
    v = conv.weight.detach()
    masked_norm = (v * conv.mask).flatten(1).norm(dim=1)
    expected = torch.log(masked_norm + 0.01) + math.log(0.1)
    assert torch.allclose(conv.log_g.detach().flatten(), expected, atol=1e-6)
    bound = 1 / math.sqrt(conv.in_channels)  # nn.Conv2d's default init for a 1x1 kernel
    assert v.abs().max() <= bound and v.abs().max() > 0.5 * bound
    # the other flow convs keep the gain of their own direction
    for other in (cell.conv1, cell.conv2):
        w = (other.weight.detach() * other.mask).flatten(1).norm(dim=1)
        assert torch.allclose(other.log_g.detach().flatten(), torch.log(w + 0.01), atol=1e-6)
