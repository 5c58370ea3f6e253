"""kernels.unet: the computed receptive field bounds the measured one tightly; padding is exact."""

from __future__ import annotations

import pytest
import torch

from kernels.unet import UNet, UNetConfig, receptive_field


def _measured_reach(cfg: UNetConfig, size: int) -> tuple[list[int], list[int]]:
    """Impulse response: input voxels with a non-zero gradient of one output voxel, at every
    phase of the down-sampling grid. Positive weights and biases keep ReLUs open."""
    torch.manual_seed(0)
    net = UNet(cfg).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(0.1, 1.0)
    low, high = [0] * cfg.ndim, [0] * cfg.ndim
    # axes are independent, so stepping all of them together covers every phase of each
    for step in range(max(cfg.factor)):
        offset = [step % f for f in cfg.factor]
        x = torch.zeros((1, cfg.in_channels) + (size,) * cfg.ndim, dtype=torch.float64, requires_grad=True)
        centre = tuple(size // 2 + o for o in offset)
        net(x)[(0, 0) + centre].backward()
        hit = (x.grad[0].abs().sum(0) > 0).nonzero()
        for a in range(cfg.ndim):
            low[a] = max(low[a], centre[a] - int(hit[:, a].min()))
            high[a] = max(high[a], int(hit[:, a].max()) - centre[a])
    return low, high


@pytest.mark.parametrize("cfg", [
    UNetConfig(ndim=2, depth=2, width=2, norm="none"),
    UNetConfig(ndim=2, depth=2, width=2, norm="none", blurpool=True, skip_top=False),
    UNetConfig(ndim=2, depth=3, width=2, norm="none", blurpool=True),
    UNetConfig(ndim=3, depth=2, width=2, norm="none", pool=(1, 2, 2), blurpool=True, skip_top=False),
], ids=["plain-2d", "n2v2-2d", "blur-depth3", "n2v2-3d-anisotropic"])
def test_receptive_field_matches_impulse_response(cfg):
    rf = receptive_field(cfg)
    low, high = _measured_reach(cfg, 160 if cfg.ndim == 2 else 72)
    assert list(rf.low) == low  # exact towards lower indices
    for computed, measured, f in zip(rf.high, high, cfg.factor):
        assert measured <= computed <= measured + f  # a safe bound, off by less than one pooling step
    assert all(h >= max(lo, hi) and h % f == 0 for h, lo, hi, f in zip(rf.halo, rf.low, rf.high, cfg.factor))


def test_forward_padded_accepts_any_size_and_matches_on_aligned_sizes():
    net = UNet(UNetConfig(ndim=2, depth=2, width=4, norm="batch")).eval()
    x = torch.randn(1, 1, 37, 50)
    assert net.forward_padded(x).shape == x.shape
    x = torch.randn(1, 1, 32, 48)
    with torch.inference_mode():
        torch.testing.assert_close(net.forward_padded(x), net(x))


def test_n2v2_options_change_the_architecture():
    plain = UNet(UNetConfig(ndim=2, depth=2, width=4))
    n2v2 = UNet(UNetConfig(ndim=2, depth=2, width=4, blurpool=True, skip_top=False))
    assert n2v2.decoders[-1][0].in_channels == 8 and plain.decoders[-1][0].in_channels == 12  # no top skip
    with pytest.raises(ValueError, match="residual"):
        UNetConfig(ndim=2, in_channels=1, out_channels=3, residual=True)
