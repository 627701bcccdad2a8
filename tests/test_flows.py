"""Affine coupling flows: invertibility, exact log-determinant, clamping, identity at init."""

import math

import pytest
import torch

from stad.methods.flows import (
    AffineCoupling,
    ChannelPermutation,
    ConditionalFlow,
    gaussian_nll,
    soft_clamp,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convolutions: threads only add OpenMP spinning, which on a shared 2-core machine made
    # the brute-force Jacobian ~30× slower; restore the setting for other tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomised_flow(channels=4, cond=2, hidden=8, seed=0):
    torch.manual_seed(seed)
    flow = ConditionalFlow(channels, cond, hidden=hidden, kernel_sizes=(3, 3, 3, 5), clamp=3.0)
    # Gamma starts at 0 (identity); non-zero gammas make the test see the real transform.
    with torch.no_grad():
        for coupling in flow.couplings:
            coupling.net1.gamma.fill_(0.7)
            coupling.net2.gamma.fill_(-0.9)
    return flow.double()


def test_flow_is_invertible():
    flow = _randomised_flow()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    c = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    z, _ = flow(x, c)
    assert not torch.allclose(z, x)
    assert torch.allclose(flow.inverse(z, c), x, atol=1e-4)


def test_log_det_matches_brute_force_jacobian():
    flow = _randomised_flow()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    c = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v, c)[0], x)
    jac = jac.reshape(x.numel(), x.numel())
    _, expected = torch.linalg.slogdet(jac)
    _, log_det = flow(x, c)
    assert log_det.shape == (1, 3, 3)
    assert math.isclose(log_det.sum().item(), expected.item(), rel_tol=1e-6, abs_tol=1e-6)


def test_gamma_zero_makes_the_flow_the_identity_at_init():
    torch.manual_seed(0)
    flow = ConditionalFlow(6, 4, hidden=8)
    x, c = torch.randn(2, 6, 5, 5), torch.randn(2, 4, 5, 5)
    # Permutations alone are not the identity; undo them to compare.
    z, log_det = flow(x, c)
    permuted = x
    for perm in flow.permutations:
        permuted = perm(permuted)
    assert torch.equal(z, permuted)
    assert torch.equal(log_det, torch.zeros(2, 5, 5))
    assert torch.allclose(gaussian_nll(z, log_det), 0.5 * x.pow(2).sum(1))


def test_soft_clamp_bounds_the_log_scale_and_is_near_identity_at_zero():
    s = torch.tensor([-1e6, -10.0, 0.0, 1e-3, 10.0, 1e6])
    out = soft_clamp(s, 3.0)
    assert out.abs().max() < 3.0
    assert math.isclose(out[3].item(), 0.636e-3, rel_tol=1e-3)  # 0.636 ≈ 2/π: slope ~1 at 0
    assert out[-1] > 2.99 * 0.999 - 1e-3 and out[0] == -out[-1]


def test_coupling_log_scale_never_exceeds_the_clamp():
    torch.manual_seed(0)
    block = AffineCoupling(4, 0, hidden=8, kernel_size=3, clamp=1.9)
    with torch.no_grad():
        block.net1.gamma.fill_(1e4)
        block.net2.gamma.fill_(1e4)
    _, log_det = block(torch.randn(3, 4, 4, 4) * 100)
    # Each of the 4 channels contributes at most α to the log-determinant.
    assert log_det.abs().max() <= 4 * 1.9


def test_permutation_is_fixed_by_seed_and_invertible():
    a, b = ChannelPermutation(16, seed=1), ChannelPermutation(16, seed=1)
    assert torch.equal(a.perm, b.perm)
    assert not torch.equal(a.perm, ChannelPermutation(16, seed=2).perm)
    x = torch.randn(1, 16, 2, 2)
    assert torch.equal(a.inverse(a(x)), x)


def test_coupling_needs_two_channels():
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1, 0, hidden=4, kernel_size=3, clamp=3.0)
