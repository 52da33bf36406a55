"""Rotations of 3-vectors, as nanoBragg applies them.

All functions take angles in radians and vectors with any leading batch shape ``(*, 3)``.
"""
from __future__ import annotations

import torch


def axis_rotation_matrix(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrix for a right-handed turn by ``angle`` about unit ``axis`` (Rodrigues).

    R v = v cos(phi) + (u x v) sin(phi) + u (u.v)(1 - cos(phi)), as nanoBragg's rotate_axis.

    Args:
        axis: (*, 3) unit vector (dimensionless).
        angle: (*) angle (rad), broadcast against ``axis[..., 0]``.
    Returns:
        (*, 3, 3) matrix acting on column vectors.

    >>> axis_rotation_matrix(torch.tensor([0., 0., 1.]), torch.tensor(torch.pi / 2)).round()
    tensor([[ 0., -1.,  0.],
            [ 1.,  0.,  0.],
            [ 0.,  0.,  1.]])
    """
    angle = torch.as_tensor(angle, dtype=axis.dtype, device=axis.device)
    c, s = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    ux, uy, uz = axis.unbind(-1)
    zero = torch.zeros_like(ux)
    cross = torch.stack([torch.stack([zero, -uz, uy], -1),
                         torch.stack([uz, zero, -ux], -1),
                         torch.stack([-uy, ux, zero], -1)], -2)
    outer = axis[..., :, None] * axis[..., None, :]
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    return eye * c + cross * s + outer * (1 - c)


def rotate_axis(v: torch.Tensor, axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate ``v`` (*, 3) about unit ``axis`` (*, 3) by ``angle`` (rad)."""
    return (axis_rotation_matrix(axis, angle) @ v[..., None])[..., 0]


def xyz_rotation_matrix(rx: torch.Tensor, ry: torch.Tensor, rz: torch.Tensor) -> torch.Tensor:
    """Matrix of nanoBragg's ``rotate``: about x by ``rx``, then y by ``ry``, then z by ``rz``.

    Args:
        rx, ry, rz: angles (rad), scalars or broadcastable tensors.
    Returns:
        (*, 3, 3) matrix Rz @ Ry @ Rx.
    """
    dtype = rx.dtype
    ex = torch.tensor([1.0, 0.0, 0.0], dtype=dtype, device=rx.device)
    ey = torch.tensor([0.0, 1.0, 0.0], dtype=dtype, device=rx.device)
    ez = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=rx.device)
    return axis_rotation_matrix(ez, rz) @ axis_rotation_matrix(ey, ry) @ axis_rotation_matrix(ex, rx)
