import torch

from nbfunc.structure_factors import interpolation_out_of_range, nearest_f, tricubic_f

D = torch.float64


def grid(fn, n=8, origin=(-3, -3, -3)):
    idx = [torch.arange(n, dtype=D) + o for o in origin]
    h, k, l = torch.meshgrid(*idx, indexing="ij")
    return fn(h, k, l), origin


def test_nearest_inside_and_outside():
    f, origin = grid(lambda h, k, l: 100 * h + 10 * k + l)
    default = torch.tensor(-1.0, dtype=D)
    h0 = torch.tensor([[1.0, 2.0, -3.0], [9.0, 0.0, 0.0]], dtype=D)
    out = nearest_f(h0, f, origin, default)
    assert out.tolist() == [100 + 20 - 3, -1.0]


def test_empty_grid_gives_default_everywhere():
    out = nearest_f(torch.zeros(4, 3, dtype=D), torch.zeros(0, 0, 0, dtype=D), (0, 0, 0), torch.tensor(7.0, dtype=D))
    assert out.tolist() == [7.0] * 4


def test_tricubic_reproduces_cubic_polynomials():
    poly = lambda h, k, l: 1 + h - 2 * k + 0.5 * l + h * k * l + h**3 - 0.25 * l**3
    f, origin = grid(poly)
    pts = torch.tensor([[0.3, -0.7, 1.2], [1.5, 0.25, -0.5]], dtype=D)
    assert not interpolation_out_of_range(pts, tuple(f.shape), origin).any()
    assert torch.allclose(tricubic_f(pts, f, origin), poly(*pts.unbind(-1)))


def test_tricubic_equals_grid_at_nodes():
    f, origin = grid(lambda h, k, l: torch.sin(h) + torch.cos(k * l))
    pts = torch.tensor([[0.0, 1.0, -1.0]], dtype=D)
    assert torch.allclose(tricubic_f(pts, f, origin), nearest_f(pts, f, origin, torch.tensor(0.0, dtype=D)))


def test_out_of_range_rule_matches_c():
    # C: out of range when h - h_min + 3 > h_range or h - 2 < h_min (grid -3..4, range 8)
    shape, origin = (8, 8, 8), (-3, -3, -3)
    inside = torch.tensor([[-1.0, 0.0, 2.0]], dtype=D)
    low = torch.tensor([[-1.01, 0.0, 0.0]], dtype=D)
    high = torch.tensor([[2.01, 0.0, 0.0]], dtype=D)
    assert interpolation_out_of_range(torch.cat([inside, low, high]), shape, origin).tolist() == [False, True, True]
