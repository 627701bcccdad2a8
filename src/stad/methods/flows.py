"""Conditional normalizing flows on feature maps: GLOW-style affine coupling blocks (Real-NVP).

Used by AST's teacher. Every block maps a B×C×h×w map to a map of the same shape and returns
the log-determinant of its Jacobian per position (B×h×w). The subnetworks are convolutions, so an
output position depends on neighbouring inputs, but only through the half that is not being
scaled: the Jacobian of the whole map is triangular and its log-determinant is the sum of the
per-position log-scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

# φ(s) = α·0.636·atan(s/α): 0.636 ≈ 2/π, so |φ(s)| < α (AST / CS-Flow's soft clamp).
_ATAN_SCALE = 0.636


def soft_clamp(s: Tensor, alpha: float) -> Tensor:
    """Soft clamp of log-scales: ``α·0.636·atan(s/α)``, bounded by ±α·0.999 and ≈ s near 0."""
    return alpha * _ATAN_SCALE * torch.atan(s / alpha)


class SubnetConv(nn.Module):
    """Coupling subnetwork: conv k×k → ReLU → conv k×k (replicate padding), times a gamma.

    The learnable scalar gamma starts at 0 (the "gamma trick"), so every coupling block, and so
    the whole flow, is the identity at initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(
            in_channels, hidden, kernel_size, padding=pad, padding_mode="replicate"
        )
        self.conv2 = nn.Conv2d(
            hidden, out_channels, kernel_size, padding=pad, padding_mode="replicate"
        )
        self.act = nn.ReLU()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        """B×in×h×w → B×out×h×w."""
        return self.gamma * self.conv2(self.act(self.conv1(x)))


class AffineCoupling(nn.Module):
    """GLOW-style conditional affine coupling: both halves are updated, one after the other.

    With x = (x1, x2) split along channels and c the condition::

        y1 = exp(φ(s2)) ⊙ x1 + t2,   (s2, t2) = net2([x2, c])
        y2 = exp(φ(s1)) ⊙ x2 + t1,   (s1, t1) = net1([y1, c])

    so the second update is conditioned on the *new* first half; φ is :func:`soft_clamp`.
    """

    def __init__(
        self, channels: int, cond_channels: int, hidden: int, kernel_size: int, clamp: float
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling block needs at least 2 channels, got {channels}")
        self.len1 = channels // 2
        self.len2 = channels - self.len1
        self.clamp = float(clamp)
        self.net2 = SubnetConv(self.len2 + cond_channels, 2 * self.len1, hidden, kernel_size)
        self.net1 = SubnetConv(self.len1 + cond_channels, 2 * self.len2, hidden, kernel_size)

    def _scale_shift(
        self, net: nn.Module, x: Tensor, cond: Tensor | None, n: int
    ) -> tuple[Tensor, Tensor]:
        inp = x if cond is None else torch.cat([x, cond], dim=1)
        out = net(inp)
        return soft_clamp(out[:, :n], self.clamp), out[:, n:]

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args: x B×C×h×w, cond B×C_c×h×w or None. Returns y B×C×h×w and log|det J| B×h×w."""
        x1, x2 = x[:, : self.len1], x[:, self.len1 :]
        log_s2, t2 = self._scale_shift(self.net2, x2, cond, self.len1)
        y1 = torch.exp(log_s2) * x1 + t2
        log_s1, t1 = self._scale_shift(self.net1, y1, cond, self.len2)
        y2 = torch.exp(log_s1) * x2 + t1
        log_det = log_s2.sum(dim=1) + log_s1.sum(dim=1)
        return torch.cat([y1, y2], dim=1), log_det

    def inverse(self, y: Tensor, cond: Tensor | None = None) -> Tensor:
        """The exact inverse of :meth:`forward`: y B×C×h×w → x B×C×h×w."""
        y1, y2 = y[:, : self.len1], y[:, self.len1 :]
        log_s1, t1 = self._scale_shift(self.net1, y1, cond, self.len2)
        x2 = (y2 - t1) * torch.exp(-log_s1)
        log_s2, t2 = self._scale_shift(self.net2, x2, cond, self.len1)
        x1 = (y1 - t2) * torch.exp(-log_s2)
        return torch.cat([x1, x2], dim=1)


class ChannelPermutation(nn.Module):
    """A fixed random channel permutation (volume-preserving: log|det J| = 0).

    The permutation is numpy's legacy ``RandomState(seed).permutation(channels)``, as AST's code
    draws it with ``np.random.seed(seed)``.
    """

    perm: Tensor  # buffers (register_buffer)
    inv: Tensor

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        perm = torch.from_numpy(np.random.RandomState(seed).permutation(channels))
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv", torch.argsort(perm), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """B×C×h×w → B×C×h×w with channels reordered."""
        return x[:, self.perm]

    def inverse(self, y: Tensor) -> Tensor:
        """Undo :meth:`forward`."""
        return y[:, self.inv]


class ConditionalFlow(nn.Module):
    """Permutation + affine coupling, repeated: a conditional Real-NVP on feature maps.

    Block k uses the permutation of seed k and the k-th kernel size.
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        hidden: int,
        kernel_sizes: Sequence[int] = (3, 3, 3, 5),
        clamp: float = 3.0,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.permutations = nn.ModuleList(
            ChannelPermutation(channels, seed=k) for k in range(len(kernel_sizes))
        )
        self.couplings = nn.ModuleList(
            AffineCoupling(channels, cond_channels, hidden, int(k), clamp) for k in kernel_sizes
        )

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args: x B×C×h×w, cond B×C_c×h×w or None. Returns z B×C×h×w and log|det J| B×h×w."""
        log_det = torch.zeros(x.shape[0], *x.shape[2:], device=x.device, dtype=x.dtype)
        for perm, coupling in zip(self.permutations, self.couplings, strict=True):
            x, ld = coupling(perm(x), cond)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """x from z: B×C×h×w → B×C×h×w."""
        for perm, coupling in zip(
            reversed(self.permutations), reversed(self.couplings), strict=True
        ):
            z = cast(ChannelPermutation, perm).inverse(
                cast(AffineCoupling, coupling).inverse(z, cond)
            )
        return z


def gaussian_nll(z: Tensor, log_det: Tensor) -> Tensor:
    """Per-position negative log-likelihood up to a constant: ½||z||² − log|det J|.

    Args:
        z: B×C×h×w flow output.
        log_det: B×h×w log-determinant.

    Returns:
        B×h×w.
    """
    return 0.5 * z.pow(2).sum(dim=1) - log_det
