import math

import torch

from nbfunc.rotation import axis_rotation_matrix, rotate_axis, xyz_rotation_matrix


class TestAxisRotation:
    def test_known_quarter_turn(self):
        r = axis_rotation_matrix(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor(math.pi / 2, dtype=torch.float64))
        assert torch.allclose(r @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                              torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-15)

    def test_orthonormal_and_proper(self):
        axis = torch.nn.functional.normalize(torch.randn(10, 3, dtype=torch.float64), dim=-1)
        r = axis_rotation_matrix(axis, torch.rand(10, dtype=torch.float64) * 6)
        eye = torch.eye(3, dtype=torch.float64).expand(10, 3, 3)
        assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-13)
        assert torch.allclose(torch.linalg.det(r), torch.ones(10, dtype=torch.float64))

    def test_round_trip(self):
        axis = torch.nn.functional.normalize(torch.randn(3, dtype=torch.float64), dim=0)
        v = torch.randn(3, dtype=torch.float64)
        back = rotate_axis(rotate_axis(v, axis, torch.tensor(0.7)), axis, torch.tensor(-0.7))
        assert torch.allclose(back, v, atol=1e-14)

    def test_axis_is_fixed(self):
        axis = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), dim=0)
        assert torch.allclose(rotate_axis(axis, axis, torch.tensor(1.3)), axis, atol=1e-15)

    def test_gradcheck(self):
        axis = torch.nn.functional.normalize(torch.randn(3, dtype=torch.float64), dim=0)
        angle = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: axis_rotation_matrix(axis, a), (angle,))


class TestXYZRotation:
    def test_order_is_x_then_y_then_z(self):
        rx, ry, rz = (torch.tensor(a, dtype=torch.float64) for a in (0.1, -0.2, 0.3))
        ex, ey, ez = torch.eye(3, dtype=torch.float64)
        expected = axis_rotation_matrix(ez, rz) @ axis_rotation_matrix(ey, ry) @ axis_rotation_matrix(ex, rx)
        assert torch.allclose(xyz_rotation_matrix(rx, ry, rz), expected)

    def test_zero_is_identity(self):
        z = torch.tensor(0.0, dtype=torch.float64)
        assert torch.equal(xyz_rotation_matrix(z, z, z), torch.eye(3, dtype=torch.float64))
