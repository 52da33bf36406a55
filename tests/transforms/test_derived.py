"""`nbfunc.derived`: rules for the first derivatives of a derived call.

A toy function ``f(x, y) = {"b": x^3 y, "a": sum(x y)}`` with rules whose forward returns the
residual ``3 x^2 y`` and whose VJP uses it: every transform and autograd give the exact
derivatives, the first ones from the rules (counted), the higher ones from the function.
Both compile modes: eager derived functions, and a stand-in ``torch.compile`` that records
that compiled code only ever sees plain tensors.
"""
from __future__ import annotations

import pytest
import torch

from nbfunc.compile import COMPILE_DISABLED
from nbfunc.derived import StructuredRules, derived_call


def _cube(x, y, *, scale: float):
    return {"b": scale * x**3 * y, "a": (x * y).sum(), "n": x.argmax()}


class _CubeRules(StructuredRules):
    def __init__(self):
        self.forwards = self.vjps = 0

    def forward(self, args, kwargs):
        self.forwards += 1
        x, y = args
        return _cube(x, y, **kwargs), (3 * kwargs["scale"] * x**2 * y,)

    def inputs(self, args, kwargs):
        return args

    def vjp(self, kwargs, inputs, residuals, cotangent):
        self.vjps += 1
        x, y = inputs
        (slope,) = residuals
        gb, ga = cotangent["b"], cotangent["a"]
        return slope * gb + ga * y, kwargs["scale"] * x**3 * gb + ga * x


@pytest.fixture(params=["eager", "stand-in compile"])
def call(request, monkeypatch):
    """``f(x, y)`` through `derived_call` with `_CubeRules`, the rules, the compiled calls, and
    ``make(rules)``, which makes such an ``f`` with other rules."""
    compiled = []
    if request.param != "eager":
        def fake_compile(fn, **options):
            def run(*args):
                compiled.append(any(torch._C._functorch.is_batchedtensor(a)
                                    or torch._C._functorch.is_gradtrackingtensor(a) for a in args))
                return fn(*args)
            return run
        monkeypatch.setattr(torch, "compile", fake_compile)
    compile = request.param != "eager"

    def make(rules):
        cache = {}

        def f(x, y):
            return derived_call(cache, _cube, "cube", (x, y), {"scale": 2.0}, _no_failure,
                                compile=compile, rules=rules)
        return f
    rules = _CubeRules()
    return make(rules), rules, compiled, make


def _no_failure(name, err):
    raise AssertionError(f"{name}: {err}")


X = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
Y = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)


def test_first_derivatives_come_from_the_rules(call):
    f, rules, compiled, _ = call
    loss = lambda t: f(t, Y)["b"].sum() + f(t, Y)["a"]
    torch.testing.assert_close(torch.func.grad(loss)(X), 6 * X**2 * Y + Y)
    assert rules.forwards == 2 and rules.vjps == 2
    torch.testing.assert_close(torch.func.jacrev(lambda t: f(t, Y)["b"])(X), torch.diag(6 * X**2 * Y))
    torch.testing.assert_close(torch.func.jacfwd(lambda t: f(t, Y)["b"])(X), torch.diag(6 * X**2 * Y))
    _, tangent = torch.func.jvp(lambda t: f(t, Y)["b"], (X,), (torch.ones_like(X),))
    torch.testing.assert_close(tangent, 6 * X**2 * Y)
    assert rules.vjps >= 5       # the JVPs are the transpose of the rules' VJP
    out = f(X, Y)
    assert out["n"] == 2 and set(out) == {"a", "b", "n"}
    assert not any(compiled)


class _CubeJvpRules(_CubeRules):
    """`_CubeRules` with their JVP written out (`nbfunc.derived.Rules.jvp`), counted."""

    def __init__(self):
        super().__init__()
        self.jvps = 0

    def jvp(self, args, kwargs, inputs, residuals, tangents):
        self.jvps += 1
        (x, y), (tx, ty), (slope,) = inputs, tangents, residuals
        return {"b": slope * tx + kwargs["scale"] * x**3 * ty, "a": (tx * y + x * ty).sum(),
                "n": None}


def test_rules_with_their_own_jvp(call, request):
    """Eagerly, `jacfwd` and `jvp` take the rules' own JVP (not the VJP's transpose), with the
    integer output's tangent left out; compiled, the VJP's transpose is used. Either way the
    derivatives, batched ones and a Hessian (whose outer JVP is derived from the function)
    are exact."""
    _, _, compiled, make = call
    rules = _CubeJvpRules()
    f = make(rules)
    jac = torch.func.jacfwd(lambda t, u: f(t, u)["b"], argnums=(0, 1))(X, Y)
    torch.testing.assert_close(jac[0], torch.diag(6 * X**2 * Y))
    torch.testing.assert_close(jac[1], torch.diag(2 * X**3))
    _, tangent = torch.func.jvp(lambda t: f(t, Y)["a"], (X,), (torch.ones_like(X),))
    torch.testing.assert_close(tangent, Y.sum())
    if request.node.callspec.params["call"] == "eager":  # the rules' JVP, no VJP
        assert rules.jvps == 2 and rules.vjps == 0
    else:
        assert rules.jvps == 0 and rules.vjps > 0
    grid = torch.stack([X, 2 * X])
    torch.testing.assert_close(torch.func.vmap(torch.func.jacfwd(lambda t: f(t, Y)["b"]))(grid),
                               torch.diag_embed(6 * grid**2 * Y))
    torch.testing.assert_close(torch.func.hessian(lambda t: f(t, Y)["b"].sum())(X),
                               torch.diag(12 * X * Y))
    assert not any(compiled)


def _assert_hessian_in_both_inputs(f):
    """Second derivatives of ``sum(b) + a`` in x and y (the mixed blocks of a JVP of a VJP)."""
    both = torch.func.hessian(lambda t, u: f(t, u)["b"].sum() + f(t, u)["a"], argnums=(0, 1))(X, Y)
    expected = ((torch.diag(12 * X * Y), torch.diag(6 * X**2 + 1)),
                (torch.diag(6 * X**2 + 1), torch.zeros(3, 3, dtype=X.dtype)))
    for row, want_row in zip(both, expected):
        for block, want in zip(row, want_row):
            torch.testing.assert_close(block, want)


def test_autograd_and_higher_orders(call):
    f, rules, compiled, _ = call
    x = X.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x, Y)["b"].sum(), x, create_graph=True)
    torch.testing.assert_close(g, 6 * X**2 * Y)
    assert rules.vjps == 1
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, 12 * X * Y)    # derived from the function, not the rules
    loss = lambda t: f(t, Y)["b"].sum()
    torch.testing.assert_close(torch.func.hessian(loss)(X), torch.diag(12 * X * Y))
    _assert_hessian_in_both_inputs(f)
    grid = torch.stack([X, 2 * X])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(grid), 6 * grid**2 * Y)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacfwd(lambda t: f(t, Y)["b"]))(grid),
                               torch.diag_embed(6 * grid**2 * Y))
    assert torch.autograd.gradgradcheck(lambda t: f(t, Y)["b"], (x,))
    assert not any(compiled)


def test_only_the_gradients_asked_for(call):
    """A gradient with respect to one input is that input's (the rules' VJP keeps the
    gradients that autograd asks for)."""
    f, rules, _, _ = call
    torch.testing.assert_close(torch.func.grad(lambda u: f(X, u)["b"].sum())(Y), 2 * X**3)
    torch.testing.assert_close(torch.func.grad(lambda t: f(t, Y)["b"].sum())(X), 6 * X**2 * Y)
    gx, gy = torch.func.grad(lambda t, u: f(t, u)["a"], argnums=(0, 1))(X, Y)
    torch.testing.assert_close((gx, gy), (Y, X))
    assert rules.vjps == 3


class _AlongRules(_CubeRules):
    """`_CubeRules` with the VJP along the residual's tangent (``d(3 s x^2 y) = 3 s (2 x y dx
    + x^2 dy)``), for inputs x and y."""

    def __init__(self):
        super().__init__()
        self.alongs = 0

    def vjp_along_supported(self, mask_args, mask_kwargs) -> bool:
        return True

    def vjp_along(self, args, kwargs, inputs, residuals, tangents_args, tangents_kwargs, cotangent):
        self.alongs += 1
        x, y = args
        tx, ty = (torch.zeros_like(v) if t is None else t for v, t in zip(args, tangents_args))
        d_slope = 3 * kwargs["scale"] * (2 * x * y * tx + x**2 * ty)
        return d_slope * cotangent["b"], torch.zeros_like(y)


def test_hessians_along_the_residuals_tangent(call):
    """With `Rules.vjp_along`, the JVP of the rules' VJP (Hessians, and the Jacobian of a
    vector's Jacobian, whose cotangents are batched) is the VJP's own derivative: exact, and
    taken along the residuals' tangent."""
    _, _, compiled, make = call
    rules = _AlongRules()
    g = make(rules)
    _assert_hessian_in_both_inputs(g)
    assert rules.alongs > 0
    alongs = rules.alongs
    jac2 = torch.func.jacfwd(torch.func.jacrev(lambda t: g(t, Y)["b"]))(X)
    want = torch.zeros(3, 3, 3, dtype=X.dtype)
    want[range(3), range(3), range(3)] = 12 * X * Y
    torch.testing.assert_close(jac2, want)
    assert rules.alongs > alongs
    assert not any(compiled)


def test_vmap_of_rules(call):
    """Under ``vmap``, eager rules run once for the whole batch (compiled ones member by
    member); gradients, Jacobians and Hessians of the members are exact, and the gradient
    of an input that is not batched sums the members'."""
    f, rules, compiled, make = call
    grid = torch.stack([X, 2 * X, 3 * X])
    loss = lambda t: f(t, Y)["b"].sum()
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(grid), 6 * grid**2 * Y)
    eager = not compiled  # the stand-in compile records the derived VJP's calls
    assert rules.forwards == (1 if eager else 3)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacfwd(lambda t: f(t, Y)["b"]))(grid),
                               torch.diag_embed(6 * grid**2 * Y))
    ys = torch.stack([Y, -Y, 2 * Y])
    total = lambda t: torch.func.vmap(lambda u: f(t, u)["b"].sum())(ys).sum()
    torch.testing.assert_close(torch.func.grad(total)(X), 6 * X**2 * ys.sum(0))
    along = _AlongRules()
    g = make(along)
    hessians = torch.func.vmap(torch.func.hessian(lambda t: g(t, Y)["b"].sum()))(grid)
    torch.testing.assert_close(hessians, torch.diag_embed(12 * grid * Y))
    assert along.alongs > 0
    alongs = along.alongs
    # the transforms outside the vmap: the batched rules' own VJP along the tangent
    of_batch = torch.func.hessian(lambda t: torch.func.vmap(lambda u: g(t, u)["b"].sum())(ys).sum())(X)
    torch.testing.assert_close(of_batch, torch.diag(12 * X * ys.sum(0)))
    mixed = torch.func.hessian(lambda t, v: torch.func.vmap(lambda u: g(t, u)["b"].sum())(v).sum(),
                               argnums=(0, 1))(X, ys)[0][1]  # d2 / dx_i dy_mj = 6 x_i^2 (i = j)
    torch.testing.assert_close(mixed, torch.diag(6 * X**2)[:, None, :].expand(3, 3, 3))
    assert along.alongs > alongs
    assert not any(compiled)


class _WrongCount(_CubeRules):
    def vjp(self, kwargs, inputs, residuals, cotangent):
        return super().vjp(kwargs, inputs, residuals, cotangent)[:1]


def test_rules_returning_another_number_of_gradients_are_refused():
    def f(x):
        return derived_call({}, _cube, "cube", (x, Y), {"scale": 2.0}, _no_failure, compile=False,
                            rules=_WrongCount())
    with pytest.raises(TypeError, match="returned 1 gradients for 2 inputs"):
        torch.func.grad(lambda t: f(t)["a"])(X)


@pytest.mark.skipif(COMPILE_DISABLED, reason="run once, by the test command's compiled run (a "
                    "tiny render is eager in both runs; torch.compile's tracing takes ~8 s)")
def test_torch_compile_over_a_transform_runs_the_render_as_nbfunc_runs_it(tiny):
    """A user's ``torch.compile(torch.func.grad(loss))`` gives the transform's gradient, and
    a render after it gives the same image (dynamo does not trace the render)."""
    import nbfunc
    from nbfunc.tree import get_leaf

    def loss(q):
        return nbfunc.simulate(q).sum()

    before = nbfunc.simulate(tiny)
    expected = torch.func.grad(loss)(tiny)
    got = torch.compile(torch.func.grad(loss))(tiny)
    for path in ("crystal.cell_a", "detector.distance", "beam.wavelength"):
        torch.testing.assert_close(get_leaf(got, path), get_leaf(expected, path),
                                   rtol=1e-12, atol=0)
    torch.testing.assert_close(nbfunc.simulate(tiny), before, rtol=0, atol=0)
