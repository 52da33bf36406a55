"""The compile wrapper: compiled equals eager, failures are reported, flags are validated.

One compiled render is made, on the 6 x 6 base tree (the first compile of the kernel takes
5-20 s on CPU; ``test_vmap.py`` reuses it); it is skipped when ``NANOBRAGG_DISABLE_COMPILE=1``.
The compiled carry path is compared with the C program's images in ``tests/parity``. The
wrapper's logic (failure warning, strict mode, eager under transforms and autograd) is tested
with a stand-in for ``torch.compile`` in both modes.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.utils._pytree as pytree

import nbfunc
import nbfunc.compile as nbcompile
import nbfunc.render
import nbfunc.lattice_sum as lattice_module
from nbfunc.beam import polarization_axes
from nbfunc.detector import solid_angle
from nbfunc.lattice import lattice_factor, square_lattice
from nbfunc.rotation import axis_rotation_matrix
from nbfunc.lattice_sum import (lattice_partials, pixel_partials, pixel_partials_chain,
                                pixel_partials_sum, pixel_partials_tangent, pixel_row_layout,
                                pixel_rows, plain_geometry, row_sums)
from _transforms_support import (CONFIGS, assert_close_scaled, eager_mode, leaves_dict, make_params,
                                 poisson_nll)

needs_compile = pytest.mark.skipif(nbcompile.COMPILE_DISABLED,
                                   reason="NANOBRAGG_DISABLE_COMPILE=1: nothing is compiled")
run_once = pytest.mark.skipif(nbcompile.COMPILE_DISABLED,
                              reason="run once, by the test command's compiled run: the subprocess "
                                     "sets (or ignores) NANOBRAGG_DISABLE_COMPILE itself, so both "
                                     "runs would test the same thing")


@pytest.fixture(autouse=True)
def compile_every_render(monkeypatch):
    """Renders here run compiled however small (elsewhere they compile only after
    `nbfunc.compile.COMPILE_AFTER` evaluations); references are made in `eager_mode`."""
    monkeypatch.setattr(nbcompile, "COMPILE_AFTER", 0)
    monkeypatch.setattr(nbcompile, "COMPILE_AFTER_TRANSFORMS", 0)


# --------------------------------------------------------------------------------------------
# compiled equals eager
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny):
    """Eager image, eager gradient of a Poisson loss, and the target of the loss."""
    with eager_mode():
        image = nbfunc.simulate(tiny)
        target = (image * 1.1).detach()
        grad = torch.func.grad(lambda p: poisson_nll(nbfunc.simulate(p), target))(tiny)
    return image, grad, target


def test_wrappers_expose_the_eager_function():
    def square(x):
        return x * x

    wrapped = nbcompile.compiled(square)
    assert wrapped.eager is square
    kernels = [v for v in vars(nbfunc.render).values() if callable(v) and hasattr(v, "eager")]
    assert kernels, "nbfunc.render should render through a nbfunc.compile.compiled kernel"


@pytest.mark.slow
@needs_compile
def test_compiled_simulate_equals_eager(tiny, reference):
    image, _, _ = reference
    with torch.no_grad():
        compiled = nbfunc.simulate(tiny)
    assert_close_scaled(compiled, image, 1e-10, "image")
    assert not torch.equal(compiled, torch.zeros_like(compiled))


def test_autograd_through_the_wrapper_equals_transform_gradient(tiny, reference):
    """torch.autograd through the compiled `simulate` (one source, one orientation: the first
    derivatives from the pixel partials, `PartialsRules`) equals torch.func.grad; a second
    gradient compiles nothing new."""
    _, grad, target = reference
    assert_autograd_matches(tiny, target, grad, 1e-10)
    with torch.compiler.set_stance("fail_on_recompile"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile falls back with a warning
        assert_autograd_matches(tiny, target, grad, 1e-10)


@pytest.fixture
def counted_partials(monkeypatch):
    """Calls of `pixel_partials_sum` (the rules' forward), counted."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["compile"])
        return pixel_partials_sum(*args, **kwargs)

    monkeypatch.setattr(nbfunc.render, "pixel_partials_sum", counted)
    return calls


def test_eager_autograd_takes_the_pixel_partials_and_differentiates_twice(tiny, reference, counted_partials,
                                                                          monkeypatch):
    """An eager render under torch.autograd takes the pixel partials: the gradient equals
    torch.func.grad's. A backward with ``create_graph`` differentiates the kernel itself for
    the second derivatives (the partials are not computed again), which equal those of a
    render without the rules."""
    _, grad, target = reference
    leaves = {path: nbfunc.tree.get_leaf(tiny, path).detach().clone().requires_grad_(True)
              for path in ("detector.distance", "crystal.cell_a", "beam.kahn_factor")}
    loss = lambda: poisson_nll(nbfunc.render._render(
        nbfunc.replace_leaves(tiny, leaves), None, compile=False)[0], target)
    got = torch.autograd.grad(loss(), list(leaves.values()), create_graph=True)
    assert counted_partials == [False]
    expected = leaves_dict(grad)
    for (path, leaf), g in zip(leaves.items(), got):
        assert_close_scaled(g, expected[path], 1e-10, path)
    second = torch.autograd.grad(got[0] + got[1], list(leaves.values()))
    assert counted_partials == [False]
    monkeypatch.setattr(nbfunc.render, "partials_apply", lambda *a: False)
    plain = torch.autograd.grad(loss(), list(leaves.values()), create_graph=True)
    plain_second = torch.autograd.grad(plain[0] + plain[1], list(leaves.values()))
    assert counted_partials == [False]
    for path, a, b in zip(leaves, second, plain_second):
        assert_close_scaled(a, b, 1e-10, path)


@pytest.mark.skipif(not nbcompile.COMPILE_DISABLED,
                    reason="eager derivatives: run by the test command's NANOBRAGG_DISABLE_COMPILE=1 "
                    "run (here every render compiles; compiled partial sums of several sources and "
                    "orientations: test_compiled_autograd_equals_transform_gradient_with_many_paths)")
@pytest.mark.parametrize("extra", [CONFIGS["mosaic_phi"][0] + " -divergence 1 -divsteps 2 -square_div",
                                   "-bandwidth 2 -bandwidth_steps 3 -mosaic 0.3 -mosaic_dom 2",
                                   "-gauss_xtal -fudge 2 -Ndef 0.5 -0.3 0.4 -mosaic 0.3 -mosaic_dom 2 "
                                   "-bandwidth 2 -bandwidth_steps 2",
                                   "-gauss_xtal -N 1",
                                   "-gauss_hkl_xtal -N 2 -fudge 0.1 -Ndef 0.3 -0.2 0.1 -mosaic 0.3 "
                                   "-mosaic_dom 2"])
def test_pixel_partials_with_sources_and_orientations_equal_the_kernel_derivatives(
        extra, input_files, counted_partials, monkeypatch):
    """Several sources (a divergence grid, or a weighted spectrum) and orientations (mosaic
    domains, phi steps), and Gaussian spots (the C program's with off-diagonal size terms,
    with N = 1; diffBragg's) take
    the pixel partials (eager): ``grad`` over the whole tree and ``jacfwd`` of the pixels
    equal the kernel's own derivatives (partials switched off)."""
    p = make_params(extra, input_files)
    with torch.no_grad():
        target = (nbfunc.simulate(p) * 1.1).detach()
    loss = lambda q: poisson_nll(nbfunc.simulate(q), target)  # noqa: E731
    names = ("crystal.cell_a", "crystal.mosaic_spread", "detector.distance")
    pixels = lambda *x: nbfunc.simulate(nbfunc.replace_leaves(p, dict(zip(names, x))))  # noqa: E731
    x = [nbfunc.tree.get_leaf(p, n) for n in names]
    with eager_mode():
        got = leaves_dict(torch.func.grad(loss)(p))
        got_jac = torch.func.jacfwd(pixels, argnums=(0, 1, 2))(*x)
        assert counted_partials
        monkeypatch.setattr(nbfunc.render, "partials_apply", lambda *a: False)
        expected = leaves_dict(torch.func.grad(loss)(p))
        expected_jac = torch.func.jacfwd(pixels, argnums=(0, 1, 2))(*x)
    for path, g in expected.items():
        if g.numel():
            assert_close_scaled(got[path], g, 1e-10, path)
    for name, a, b in zip(names, got_jac, expected_jac):
        assert_close_scaled(a, b, 1e-10, name)


@pytest.mark.skipif(not nbcompile.COMPILE_DISABLED,
                    reason="eager forward mode: run by the test command's NANOBRAGG_DISABLE_COMPILE=1 "
                    "run (compiled renders keep the sums from the forward)")
@pytest.mark.parametrize("extra", ["-gauss_xtal -Ndef 0.4 -0.2 0.3 -bandwidth 2 -bandwidth_steps 2",
                                   "-mosaic 0.3 -mosaic_dom 2 -polar 0.5"])
def test_forward_mode_makes_the_sums_where_they_pay(extra, monkeypatch):
    """Eager ``jacfwd`` alone: when a tangent reaches the geometry (cell, detector) the forward
    makes the partial sums and the JVP takes them; when only N, the size terms, the source
    weights, the fluence or the polarization move, or under ``jacfwd`` of a ``vmap`` (whose
    render cannot read the tangents), no sums are made and the JVP is derived from the
    kernel. Every Jacobian equals the kernel's own (partials switched off)."""
    p = make_params(extra)
    made = {"forward": 0, "other": 0}

    def counting(where, original):
        def counted(*args, **kwargs):
            made[where] += 1
            return original(*args, **kwargs)
        return counted

    monkeypatch.setattr(nbfunc.render, "pixel_partials_sum",
                        counting("forward", nbfunc.render.pixel_partials_sum))
    monkeypatch.setattr(nbfunc.render, "pixel_partials", counting("other", nbfunc.render.pixel_partials))
    geometric = ("crystal.cell_a", "detector.distance")
    cheap = ("crystal.Na", "beam.fluence", "beam.kahn_factor") + (
        ("crystal.Ncells_def", "beam.sources.weights") if "gauss" in extra else ())
    for names, batched, where in ((geometric, False, "forward"), (geometric, True, None),
                                  (cheap, False, None)):
        x = [nbfunc.tree.get_leaf(p, n) for n in names]
        pixels = lambda *v: nbfunc.simulate(nbfunc.replace_leaves(p, dict(zip(names, v))))  # noqa: E731
        if batched:  # a batch of one tree
            one = pixels
            pixels = lambda *v: torch.func.vmap(one)(*[t[None] for t in v])[0]  # noqa: E731
        made.update(forward=0, other=0)
        got = torch.func.jacfwd(pixels, argnums=tuple(range(len(names))))(*x)
        assert {k for k, n in made.items() if n} == ({where} if where else set()), (names, made)
        with monkeypatch.context() as off:
            off.setattr(nbfunc.render, "partials_apply", lambda *a: False)
            expected = torch.func.jacfwd(pixels, argnums=tuple(range(len(names))))(*x)
        for name, a, b in zip(names, got, expected):
            assert float(b.abs().max()) > 0.0, name
            assert_close_scaled(a, b, 1e-10, name)


@pytest.mark.skipif(not nbcompile.COMPILE_DISABLED,
                    reason="eager forward mode: run by the test command's NANOBRAGG_DISABLE_COMPILE=1 run")
@pytest.mark.parametrize("extra, names", [
    ("-gauss_xtal -polar 0.5", ("detector.distance",)),
    ("-gauss_xtal -polar 0.5", ("crystal.cell_a", "crystal.misset", "crystal.Na")),
    ("-gauss_xtal -polar 0.5", ("beam.wavelength",)),
    ("-gauss_xtal -polar 0.5", ("detector.rotx", "detector.pixel_size", "beam.fluence")),
    ("-polar 0.5", ("detector.twotheta", "crystal.Nb")),
    ("-gauss_hkl_xtal -mosaic 0.3 -mosaic_dom 2", ("crystal.mosaic_spread", "detector.beam_center_f")),
    ("-gauss_xtal -bandwidth 2 -bandwidth_steps 2", ("beam.sources.wavelengths", "detector.distance")),
])
def test_forward_mode_sums_make_the_blocks_that_move(extra, names, monkeypatch):
    """Eager ``jacfwd`` with a tangent on the geometry: the forward makes only the blocks of
    partial sums whose JVP coefficients the moving leaves reach (`render._blocks_moved`),
    fewer than all of them, and the Jacobian equals the kernel's own (partials off); a VJP
    of the primal output of such a call (autograd outside ``jvp``) makes every block again
    and equals the plain gradient."""
    p = make_params(extra)
    made = []
    original = nbfunc.render.PartialsRules.forward

    def recorded(self, args, kwargs):
        made.append(self.blocks)
        return original(self, args, kwargs)

    monkeypatch.setattr(nbfunc.render.PartialsRules, "forward", recorded)
    x = [nbfunc.tree.get_leaf(p, n) for n in names]
    pixels = lambda *v: nbfunc.simulate(nbfunc.replace_leaves(p, dict(zip(names, v))))  # noqa: E731
    got = torch.func.jacfwd(pixels, argnums=tuple(range(len(names))))(*x)
    layout = nbfunc.render._partials_layout(nbfunc.render.make_plan(p)[0], "bandwidth" in extra)
    assert made and all(b is not None and 0 < len(b) < len(layout) for b in made), (made, list(layout))
    live = [v.clone().requires_grad_() for v in x]
    out, _ = torch.func.jvp(pixels, tuple(live), tuple(torch.ones_like(v) for v in live))
    grads = torch.autograd.grad((out ** 2).sum(), live)
    with monkeypatch.context() as off:
        off.setattr(nbfunc.render, "partials_apply", lambda *a: False)
        expected = torch.func.jacfwd(pixels, argnums=tuple(range(len(names))))(*x)
        plain = [v.clone().requires_grad_() for v in x]
        expected_grads = torch.autograd.grad((pixels(*plain) ** 2).sum(), plain)
    for name, a, b in zip(names, got, expected):
        assert float(b.abs().max()) > 0.0, name
        assert_close_scaled(a, b, 1e-10, name)
    for name, a, b in zip(names, grads, expected_grads):
        assert_close_scaled(a, b, 1e-10, f"VJP {name}")


@pytest.mark.skipif(not nbcompile.COMPILE_DISABLED,
                    reason="eager forward mode: run by the test command's NANOBRAGG_DISABLE_COMPILE=1 run")
def test_batched_forward_in_chunks(monkeypatch):
    """Under ``vmap`` of ``jacfwd`` the eager forward with the partial sums runs in chunks of
    members (`PartialsRules.batch_chunk`): with chunks of 2 of 5 members the values and the
    Jacobians equal those of one call for all."""
    p = make_params("-gauss_xtal -polar 0.5")
    names = ("detector.distance", "crystal.cell_a")
    start = torch.stack([torch.stack([nbfunc.tree.get_leaf(p, n) for n in names])] * 5)
    theta = start * (1 + 1e-3 * torch.arange(5, dtype=torch.float64))[:, None]

    def pixels(t):
        return nbfunc.simulate(nbfunc.replace_leaves(p, dict(zip(names, t.unbind(0)))))
    jacobian = torch.func.vmap(torch.func.jacfwd(lambda t: (pixels(t),) * 2, has_aux=True))
    chunks = []
    original = nbfunc.render.PartialsRules.batch_chunk

    def recorded(self, args, kwargs):
        chunks.append(original(self, args, kwargs))
        return chunks[-1]

    monkeypatch.setattr(nbfunc.render.PartialsRules, "batch_chunk", recorded)
    whole = jacobian(theta)
    itemsize, n_pixels = 8, 36  # float64, 6 x 6
    monkeypatch.setattr(nbfunc.render, "BATCH_CHUNK_BYTES", 2 * n_pixels * itemsize)
    chunked = jacobian(theta)
    assert chunks[0] >= 5 and chunks[-1] == 2, chunks
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)


def test_innermost_tangent():
    """`nbfunc.compile.innermost_tangent`: None outside forward mode and under a ``vmap``
    inside ``jvp``; inside ``jvp`` whether a tensor carries the tangent."""
    from nbfunc.compile import innermost_tangent

    seen = []
    c = torch.ones(2, dtype=torch.float64)

    def f(t):
        seen.append((innermost_tangent([t * 2.0]), innermost_tangent([c * 2.0]),
                     innermost_tangent([c, t])))
        return t.sum()

    t = torch.ones(2, dtype=torch.float64)
    assert innermost_tangent([t]) is None
    torch.func.jvp(f, (t,), (t,))
    torch.func.vmap(torch.func.jacfwd(f))(t[None])
    torch.func.grad(f)(t)
    assert seen == [(True, False, True), (True, False, True), (None, None, None)]
    seen.clear()
    torch.func.jvp(torch.func.vmap(lambda u: (seen.append(innermost_tangent([u])), u.sum())[1]),
                   (t[None],), (t[None],))
    assert seen == [None]


def assert_autograd_matches(p, target, expected, rtol: float, float_only: bool = False):
    """``torch.autograd.grad`` of the Poisson loss through `simulate` equals the tree
    ``expected`` leaf by leaf (leaves without elements, or not floating when ``float_only``,
    are not differentiated)."""
    leaves, spec = pytree.tree_flatten(p)
    live = [leaf.detach().clone().requires_grad_(
        leaf.numel() > 0 and (leaf.is_floating_point() or not float_only)) for leaf in leaves]
    image = nbfunc.simulate(pytree.tree_unflatten(live, spec))
    wrt = [leaf for leaf in live if leaf.requires_grad]
    grads = iter(torch.autograd.grad(poisson_nll(image, target), wrt, allow_unused=True))
    for (path, g), leaf in zip(leaves_dict(expected).items(), live):
        if leaf.requires_grad:
            got = next(grads)
            got = torch.zeros_like(leaf) if got is None else got
            assert_close_scaled(got, g, rtol, path, atol=1e-300)


def _lattice_inputs(layered: bool):
    """Random inputs of `lattice_partials` (differentiable ones, then the fixed indices)."""
    gen = torch.Generator().manual_seed(3)
    rnd = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)
    unit = lambda v: v / v.norm()
    axes = [unit(torch.tensor(v, dtype=torch.float64) + 0.1 * rnd(3))
            for v in ([0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0])]
    incident = unit(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.01 * rnd(3))
    inputs = axes + [torch.tensor([0.05, 0.004, -0.003], dtype=torch.float64),
                     torch.tensor(1e-3, dtype=torch.float64), torch.tensor(2e-5, dtype=torch.float64),
                     incident.reshape(1, 1, 3).clone(), torch.tensor([[1.0e-10]], dtype=torch.float64),
                     (torch.eye(3, dtype=torch.float64) * 4e-9 + 1e-10 * rnd(3, 3)).reshape(1, 3, 3).clone(),
                     torch.tensor([5.0, 4.0, 1.0], dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64)]
    fixed = [torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
             torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.tensor([[1.0], [0.0]], dtype=torch.float64),
             torch.tensor([[0.0], [1.0 if layered else 0.0]], dtype=torch.float64)]
    return inputs, fixed


def _lattice_sum(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                 n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample, weight=None,
                 gauss=None):
    """``sum over paths (and orientations) of w (F F_latt)^2`` per pixel from the renderer's
    pieces (`square_lattice`, or with ``gauss = (recip, fudge, n_offdiag)`` `lattice_factor`'s
    Gaussian spots)."""
    hkl = plain_geometry(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                         orient, fpix, spix, sub_f, sub_s, layer, oversample)[-1]
    if gauss is None:
        term = (default_f * square_lattice(hkl, n_cells)) ** 2
    else:
        recip, fudge, n_offdiag = gauss  # recip None: diffBragg's Gaussian spots
        shape = "gauss_hkl" if recip is None else "gauss"
        term = (default_f * lattice_factor(shape, hkl, recip, n_cells, fudge, n_offdiag)) ** 2
    if weight is not None:
        term = term * (weight if orient.shape[0] == 1 else weight[..., None])
    return term.sum(0) if orient.shape[0] == 1 else term.sum((0, 2))


def _many(inputs, fixed, n_orient: int, per_path: bool, weighted: bool):
    """`_pixel_inputs` with ``n_orient`` orientations (small turns of the first) and, with
    ``per_path``, an incident direction and wavelength of its own for each of the two paths
    (and with ``weighted`` a weight each)."""
    inputs = list(inputs)
    if n_orient > 1:
        turns = [axis_rotation_matrix(torch.tensor([0.3, 1.0, 0.2], dtype=torch.float64) / 1.06,
                                      torch.tensor(0.002 * k, dtype=torch.float64)) for k in range(n_orient)]
        inputs[8] = torch.stack([inputs[8][0] @ t.T for t in turns])
    if per_path:
        tilt = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2e-3, -1e-3]], dtype=torch.float64)
        incident = inputs[6].reshape(1, 3) + tilt
        inputs[6] = (incident / incident.norm(dim=1, keepdim=True))[:, None]
        inputs[7] = torch.tensor([[1.0e-10], [1.02e-10]], dtype=torch.float64)
    if weighted:
        inputs.append(torch.tensor([[0.7], [1.3]], dtype=torch.float64))
    return inputs, fixed


def _pixel_inputs(layered: bool):
    """Random inputs of `pixel_partials` (the 17 differentiable ones, then the fixed indices)."""
    inputs, fixed = _lattice_inputs(layered)
    e_in, b_in = (torch.stack(x) for x in polarization_axes(
        inputs[6].reshape(3), torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)))
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)
    return inputs + [f64(0.098), e_in, b_in, f64(0.3), f64(1.7e-3), f64(25.0)], fixed


def _pixel_reference(*args, oversample, point_pixel, polarized, weight=None, gauss=None):
    """`pixel_partials`' photons per pixel composed from the renderer's own pieces:
    `_lattice_sum`, `solid_angle` and the Kahn factor of the first path."""
    lattice, (close, e_in, b_in, kahn, scale, background), fixed = args[:11], args[11:17], args[17:]
    b = _lattice_sum(*lattice, *fixed, oversample, weight, gauss)
    fpix, spix, sub_f, sub_s, layer = fixed
    _, _, _, airpath, d, _, _ = plain_geometry(*lattice[:6], lattice[6][:1], lattice[7][:1],
                                               lattice[8][:1], fpix, spix, sub_f[:1], sub_s[:1],
                                               layer[:1], oversample)
    omega = solid_angle(airpath, close, lattice[4], point_pixel)[0]
    value = scale * (background + b)
    if polarized:
        from nbfunc.beam import _dot, _kahn
        i = lattice[6][0].reshape(3).unbind(0)
        cos2t, e_out, b_out = _dot(i, d), _dot(d, e_in.unbind(0)), _dot(d, b_in.unbind(0))
        value = value * _kahn(cos2t, e_out, b_out, kahn)[0][0]
    return value * omega


@pytest.mark.parametrize("layered, point_pixel, polarized",
                         [(False, False, True), (True, False, True), (False, True, False), (True, True, True)])
def test_pixel_partials_give_the_pixel_gradient(layered, point_pixel, polarized):
    """`pixel_partials_chain` of `pixel_partials`' rows against autograd through the same pixels
    composed from the renderer's pieces (eager), and the pixels themselves; ``default_F = 0`` gives a
    finite (zero) ``default_F`` gradient."""
    inputs, fixed = _pixel_inputs(layered)
    flags = {"point_pixel": point_pixel, "polarized": polarized}
    weights = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    value, rows = pixel_partials(*inputs, *fixed, oversample=2, layered=layered, **flags)
    assert rows.shape == (pixel_rows(layered, polarized), 3)
    torch.testing.assert_close(value, _pixel_reference(*inputs, *fixed, oversample=2, **flags),
                               rtol=1e-14, atol=0.0)
    hand = _pixel_vjp(weights, rows, inputs, layered, **flags)
    a = [x.clone().requires_grad_(True) for x in inputs]
    auto = torch.autograd.grad((_pixel_reference(*a, *fixed, oversample=2, **flags) * weights).sum(), a,
                               allow_unused=True)
    for i, (got, expected) in enumerate(zip(hand, auto)):
        expected = torch.zeros_like(got) if expected is None else expected
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()),
                                   msg=lambda m: f"input {i}: {m}")
    inputs[10] = torch.zeros_like(inputs[10])
    value, rows = pixel_partials(*inputs, *fixed, oversample=2, layered=layered, **flags)
    assert torch.equal(_pixel_vjp(weights, rows, inputs, layered, **flags)[10], torch.tensor(0.0, dtype=torch.float64))


def _pixel_vjp(weights, rows, inputs, layered, n_path=0, shape="square", **flags):
    """`pixel_partials_chain` of the rows' weighted sums, with the inputs it takes picked from
    `pixel_partials`' differentiable ones (17, with Gaussian spots 3 more, then any weights)."""
    (fdet, sdet, odet, _, pixel_size, layer_depth, _, wavelength, orient, n_cells, default_f,
     close, _, _, _, scale, background) = inputs[:17]
    weighted = len(inputs) > 17 + 3 * (shape != "square")
    layout = pixel_row_layout(layered, flags["polarized"], orient.shape[0], n_path, weighted, shape)
    return pixel_partials_chain(row_sums(rows, weights, layout), fdet, sdet, odet, pixel_size,
                                layer_depth, wavelength, orient, n_cells, default_f, close, scale,
                                background, layered, **flags, n_path=n_path, weighted=weighted,
                                shape=shape)


@pytest.mark.parametrize("n_orient, per_path, weighted, layered",
                         [(3, False, False, True), (1, True, False, False), (2, True, True, True)])
def test_pixel_partials_with_sources_and_orientations(n_orient, per_path, weighted, layered):
    """`pixel_partials` with several orientations and with a source per path (its own
    incident direction, wavelength and weight): the pixels and `pixel_partials_chain` against
    autograd through the same pixels composed from the renderer's pieces (eager)."""
    inputs, fixed = _many(*_pixel_inputs(layered), n_orient, per_path, weighted)
    flags = {"point_pixel": False, "polarized": True}
    weight = inputs[17] if weighted else None
    cotangent = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    value, rows = pixel_partials(*inputs[:17], *fixed, weight=weight, oversample=2, layered=layered,
                                 per_path=per_path, **flags)
    assert rows.shape == (pixel_rows(layered, True, n_orient, 2 if per_path else 0, weighted), 3)

    def reference(*a):
        return _pixel_reference(*a[:17], *fixed, oversample=2, weight=a[17] if weighted else None, **flags)

    torch.testing.assert_close(value, reference(*inputs), rtol=1e-14, atol=0.0)
    hand = _pixel_vjp(cotangent, rows, inputs, layered, n_path=2 if per_path else 0, **flags)
    a = [x.clone().requires_grad_(True) for x in inputs]
    auto = torch.autograd.grad((reference(*a) * cotangent).sum(), a, allow_unused=True)
    for i, (got, expected) in enumerate(zip(hand, auto)):
        expected = torch.zeros_like(got) if expected is None else expected
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()),
                                   msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("shape, n_orient, per_path, weighted, offdiag",
                         [("gauss", 1, False, False, False), ("gauss", 1, False, False, True),
                          ("gauss", 3, False, False, True), ("gauss", 2, True, True, True),
                          ("gauss_hkl", 1, False, False, True), ("gauss_hkl", 2, True, True, True)])
def test_pixel_partials_of_gaussian_spots(shape, n_orient, per_path, weighted, offdiag):
    """Gaussian spots (``gauss``: the C program's, `nbfunc.lattice.gauss_and_derivatives`, or
    with no reciprocal cell diffBragg's, `gauss_hkl_and_derivatives`): the pixels and
    `pixel_partials_chain`, with the gradients of the reciprocal cell (0 for diffBragg's),
    ``fudge`` and the off-diagonal size terms, against autograd through the same pixels
    composed from the renderer's pieces (`lattice_factor`, eager); an axis with N = 1 has a
    gradient (no ``N <= 1`` rule as for square spots)."""
    inputs, fixed = _many(*_pixel_inputs(True), n_orient, per_path, weighted)
    inputs[9] = torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64)
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)
    recip = torch.linalg.inv(inputs[8][0] * 1e10).T + 1e-3 * torch.tensor(
        [[0.3, -0.2, 0.5], [0.1, 0.4, -0.6], [-0.5, 0.2, 0.3]], dtype=torch.float64)
    gauss = [recip, f64(0.8), f64([0.4, -0.3, 0.2] if offdiag else [0.0, 0.0, 0.0])]
    hkl_units = shape == "gauss_hkl"
    if hkl_units:  # the same spot width in Miller units needs a smaller N and fudge
        inputs[9], gauss[1] = torch.tensor([2.0, 1.0, 1.5], dtype=torch.float64), f64(0.05)
    weight = inputs[17] if weighted else None
    flags = {"point_pixel": False, "polarized": True}
    cotangent = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    given = (None,) + tuple(gauss[1:]) if hkl_units else tuple(gauss)
    value, rows = pixel_partials(*inputs[:17], *fixed, weight=weight, oversample=2, layered=True,
                                 per_path=per_path, gauss=given, **flags)
    n_rows = pixel_rows(True, True, n_orient, 2 if per_path else 0, weighted, shape)
    assert rows.shape == (n_rows, 3)

    def reference(*a):
        g = (None,) + tuple(a[18:20]) if hkl_units else a[17:20]
        return _pixel_reference(*a[:17], *fixed, oversample=2, weight=a[20] if weighted else None,
                                gauss=g, **flags)

    all_inputs = inputs[:17] + gauss + inputs[17:]
    torch.testing.assert_close(value, reference(*all_inputs), rtol=1e-14, atol=0.0)
    assert float(value.min()) > 0.0
    hand = _pixel_vjp(cotangent, rows, all_inputs, True, n_path=2 if per_path else 0, shape=shape,
                      **flags)
    a = [x.clone().requires_grad_(True) for x in all_inputs]
    auto = torch.autograd.grad((reference(*a) * cotangent).sum(), a, allow_unused=True)
    assert len(hand) == len(auto)
    for i, (got, expected) in enumerate(zip(hand, auto)):
        expected = torch.zeros_like(got) if expected is None else expected
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()),
                                   msg=lambda m: f"input {i}: {m}")
    for i in (9, 17, 18, 19):  # N (with N = 1), recip, fudge, the off-diagonal terms move it
        zero = (i == 19 and not offdiag) or (i == 17 and hkl_units)
        assert float(hand[i].abs().max()) > 0.0 or zero


@pytest.mark.parametrize("n_orient, per_path, weighted, layered, polarized, point_pixel",
                         [(1, False, False, False, True, False), (1, False, False, True, True, True),
                          (3, False, False, True, True, False), (1, True, False, False, False, False),
                          (2, True, True, True, True, False)])
def test_pixel_partials_tangent_is_the_rows_jvp(n_orient, per_path, weighted, layered, polarized,
                                                point_pixel):
    """`pixel_partials_tangent` (hand-written, with the gratings' second derivatives) equals
    forward-mode AD of `pixel_partials`' rows along the orientation matrices, N (one axis with
    N = 1, whose tangent is ignored) and the background, with either of the first two held,
    each row weighted by the per-pixel gradient and summed (eager)."""
    inputs, fixed = _many(*_pixel_inputs(layered), n_orient, per_path, weighted)
    inputs[9] = torch.tensor([5.0, 1.0, 7.0], dtype=torch.float64)
    weight = inputs[17] if weighted else None
    flags = {"oversample": 2, "layered": layered, "point_pixel": point_pixel, "polarized": polarized,
             "per_path": per_path}
    generator = torch.Generator().manual_seed(3)
    t_orient = torch.randn(inputs[8].shape, generator=generator, dtype=torch.float64) * 1e-10
    t_n, t_background = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    grad_v = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)

    def rows(orient, n_cells, background):
        a = list(inputs[:17])
        a[8], a[9], a[16] = orient, n_cells, background
        return pixel_partials(*a, *fixed, weight=weight, **flags)[1]

    for moving in ("both", "orient", "cells"):  # None: that input holds still
        t_o = None if moving == "cells" else t_orient
        t_c = None if moving == "orient" else t_n
        zero = torch.zeros_like
        _, expected = torch.func.jvp(rows, (inputs[8], inputs[9], inputs[16]),
                                     (zero(t_orient) if t_o is None else t_o,
                                      zero(t_n) if t_c is None else t_c, t_background))
        got = pixel_partials_tangent(*inputs[:17], *fixed, weight=weight, grad_v=grad_v,
                                     t_orient=t_o, t_n=t_c, t_background=t_background, **flags)
        n_path = inputs[6].shape[0] if per_path else 0
        layout = pixel_row_layout(layered, polarized, n_orient, n_path, weighted)
        assert sorted(got) == sorted(layout)
        got = torch.cat([got[name] for name in layout])
        assert got.shape == expected.shape[:1]
        assert float(expected.abs().max()) > 0.0
        # rows differ by many orders of magnitude: each sum to rounding of its own terms
        scale = (expected.abs() * grad_v.abs()).sum(-1)
        for i, (a, b, s) in enumerate(zip(got, expected @ grad_v, scale)):
            assert abs(float(a - b)) <= 1e-12 * float(s) + 1e-300, f"{moving}, row {i}: {a} != {b}"


@pytest.mark.parametrize("n_orient, per_path", [(1, False), (2, True)])
def test_pixel_partials_sum_splits_paths(monkeypatch, n_orient, per_path):
    """Compiled, `pixel_partials_sum` adds the partial sums of groups of at most
    `PATHS_PER_CALL` paths (here 1 of 2) and puts the paths' own rows in path order; the
    result equals `pixel_partials` of all paths (compiled forms replaced by the functions
    themselves, to skip the compile)."""
    monkeypatch.setattr(lattice_module, "_compiled_partials", lattice_partials)
    monkeypatch.setattr(lattice_module, "_compiled_pixel", pixel_partials)
    monkeypatch.setattr(lattice_module, "PATHS_PER_CALL", 1)
    inputs, fixed = _many(*_pixel_inputs(True), n_orient, per_path, per_path)
    flags = {"oversample": 2, "layered": True, "point_pixel": False, "polarized": True,
             "per_path": per_path}
    weight = inputs[17] if per_path else None
    inputs = inputs[:17]
    expected_value, expected_rows = pixel_partials(*inputs, *fixed, weight=weight, **flags)
    for compile in (True, False):
        value, rows = pixel_partials_sum(*inputs, *fixed, weight=weight, **flags, compile=compile)
        torch.testing.assert_close(value, expected_value, rtol=1e-14, atol=0.0)
        torch.testing.assert_close(rows, expected_rows, rtol=1e-13,
                                   atol=1e-13 * float(expected_rows.abs().max()))


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_float32_gradient_through_the_pixel_partials(kernel, reference):
    """A float32 render's autograd gradient (eager kernel, or the compiled one unless compilation
    is disabled) through the pixel partials agrees with float64's torch.func.grad to float32
    precision: each leaf's gradient within 1e-3 of its largest component, and no element of
    another sign where the float64 value is above 1e-2 of that scale. Why 1e-3: on this tree
    float32 images differ from float64 by up to 2.5e-5 of the image maximum (eager; 6e-6
    compiled: single-precision cell, rotations and detector geometry put ~3e-7 on the Miller
    indices, which the grating amplifies near its zeros), and the misset gradient of the
    eager float32 render through autograd, without the partials, is 3.6e-4 off (measured)."""
    if kernel == "compiled" and nbcompile.COMPILE_DISABLED:
        pytest.skip("NANOBRAGG_DISABLE_COMPILE=1: nothing is compiled")
    from _transforms_support import BASE
    from nbfunc.cli.derive import params_from_args

    _, grad, target = reference
    p32 = params_from_args(BASE.split(), dtype=torch.float32)
    paths = ("detector.distance", "crystal.cell_a", "crystal.misset", "beam.wavelength", "crystal.Na")
    leaves = {path: nbfunc.tree.get_leaf(p32, path).detach().clone().requires_grad_(True) for path in paths}
    tree = nbfunc.replace_leaves(p32, leaves)
    if kernel == "eager":
        image = nbfunc.render._render(tree, None, compile=False)[0]
    else:
        image = nbfunc.simulate(tree)
    got = torch.autograd.grad(poisson_nll(image, target.to(torch.float32)), list(leaves.values()))
    expected = leaves_dict(grad)
    for path, g in zip(paths, got):
        e = expected[path]
        assert g.dtype == torch.float32
        assert_close_scaled(g.double(), e, 1e-3, path)
        big = e.abs() > 1e-2 * e.abs().max()
        assert torch.equal(torch.sign(g.double())[big], torch.sign(e)[big]), path


_FIRST_RENDER = """
import sys, torch, nbfunc
from _transforms_support import make_params
p = make_params(base="-cell 100 100 100 90 90 90 -default_F 100 -lambda 1 -distance 100 -N 5 -detpixels 128")
image = nbfunc.simulate(p)
g = torch.func.grad(lambda q: nbfunc.simulate(q).sum())(p)
print(bool(image.sum() > 0), bool(g.detector.distance != 0), "torch._inductor.compile_fx" in sys.modules)
"""


@run_once
def test_a_first_small_render_and_gradient_do_not_compile():
    """With compilation on and the default `COMPILE_AFTER`, a fresh process renders a 128x128
    image and its gradient without compiling (inductor, which every compile loads, is never
    imported; torch.func itself imports torch._dynamo)."""
    env = {k: v for k, v in os.environ.items() if k != "NANOBRAGG_DISABLE_COMPILE"}
    out = subprocess.run([sys.executable, "-c", _FIRST_RENDER], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(__file__), check=True)
    assert out.stdout.split() == ["True", "True", "False"], out.stdout + out.stderr


def test_worth_compiling_counts_eager_work(monkeypatch):
    monkeypatch.setattr(nbcompile, "COMPILE_DISABLED", False)
    monkeypatch.setattr(nbcompile, "COMPILE_AFTER", 100)
    f = nbcompile.compiled(_double)
    assert [f.worth_compiling(n) for n in (60, 30, 20, 1)] == [False, False, True, True]
    monkeypatch.setattr(nbcompile, "COMPILE_AFTER", 1000)
    assert not f.worth_compiling(1)            # the threshold is read at every decision
    assert nbcompile.compiled(_double).worth_compiling(1000)
    monkeypatch.setattr(nbcompile, "COMPILE_AFTER_TRANSFORMS", 50)
    g = nbcompile.compiled(_double)
    assert not g.worth_compiling(40)
    inside = []
    for _ in range(2):
        torch.func.grad(lambda x: (inside.append(g.worth_compiling(30)), x.sum())[1])(torch.ones(2))
    assert inside == [False, True]
    assert not g.worth_compiling(40)           # plain and transformed work counted apart


def test_renders_below_the_threshold_run_the_eager_kernel(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(nbfunc.render._compiled_kernel, "worth_compiling",
                        lambda n: calls.append(n) or False)
    monkeypatch.setattr(nbfunc.render, "_compiled_image_setup", None)   # must not be called
    nbfunc.simulate(tiny)
    assert calls == [nbfunc.render.evaluation_count(tiny)]


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with torch's ``aot_eager`` backend: dynamo and AOT autograd trace the
    functions as inductor's would be traced, without inductor's minutes of code generation."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real(fn, **{**options, "backend": "aot_eager"}))


def _leaf_fn(p, names, fn):
    return (lambda *x: fn(nbfunc.replace_leaves(p, dict(zip(names, x))))), tuple(
        leaves_dict(p)[n] for n in names)


@needs_compile
@pytest.mark.parametrize("partials", [True, False])
def test_compiled_transforms_equal_eager_transforms(tiny, reference, aot_eager, partials, monkeypatch):
    """grad and jacfwd of a render through the compiled functions derived from the set-up and
    the kernel (VJPs, JVPs as VJPs of VJPs, their batched forms), with the first derivatives
    from the pixel partials (`PartialsRules`) or from the kernel, equal the eager transforms
    in float64. (Hessians, jacrev, jvp and vmap of them compose the same rules: with eager
    derived functions in every transform test, with a stand-in compile in
    `test_transforms_run_compiled_derived_functions` and ``test_derived.py``; tracing a
    Hessian's derived functions here took about a minute more.)"""
    if not partials:
        monkeypatch.setattr(nbfunc.render, "partials_apply", lambda *a: False)
    _, expected_grad, target = reference
    names = ["detector.distance", "crystal.cell_a", "crystal.misset"]
    image, x = _leaf_fn(tiny, names, nbfunc.simulate)
    jobs = {
        "grad": lambda: torch.func.grad(lambda q: poisson_nll(nbfunc.simulate(q), target))(tiny),
        "jacfwd": lambda: torch.func.jacfwd(image, argnums=(0, 1, 2))(*x),
    }
    got = {name: job() for name, job in jobs.items()}
    for name, job in jobs.items():
        with eager_mode():
            want = job()
        for a, b in zip(pytree.tree_leaves(got[name]), pytree.tree_leaves(want)):
            assert_close_scaled(a, b, 1e-10, name, atol=1e-300)
    for a, b in zip(pytree.tree_leaves(got["grad"]), pytree.tree_leaves(expected_grad)):
        assert_close_scaled(a, b, 1e-10, "grad vs reference", atol=1e-300)


@pytest.mark.slow
@needs_compile
def test_compiled_diffbragg_models_equal_eager(aot_eager):
    """diffBragg's models through the compiled functions (traced by dynamo and AOT autograd,
    ``aot_eager``): the domain-size tensor in Miller units, quadrature mosaic domains with an
    anisotropic spread, diffuse scattering with a B factor, a weighted spectrum and G; the
    image and ``grad`` over the whole tree equal the eager ones in float64."""
    p = make_params("-gauss_hkl_xtal -Ndef 0.5 -0.3 0.2 -mosaic_quadrature -mosaic_dom 6 "
                    "-eta 0.3 0.2 0.25 -diffuse -diffuse_gamma 3 4 2.5 -diffuse_sigma 0.3 0.4 0.5 "
                    "-laue_group P4/mmm -bfactor 20 -bandwidth 1 -bandwidth_steps 3 -G 1.5")
    with eager_mode():
        expected = nbfunc.simulate(p)
        target = (expected * 1.1).detach()
        expected_grad = leaves_dict(torch.func.grad(lambda q: poisson_nll(nbfunc.simulate(q), target))(p))
    assert_close_scaled(nbfunc.simulate(p), expected, 1e-12, "image")
    got = leaves_dict(torch.func.grad(lambda q: poisson_nll(nbfunc.simulate(q), target))(p))
    for path, g in expected_grad.items():
        if g.numel():
            assert_close_scaled(got[path], g, 1e-10, path, atol=1e-300)


@pytest.mark.slow
@needs_compile
def test_inductor_compiled_gradient_equals_eager(tiny, reference):
    """The same with torch's default backend (inductor): the gradient of the whole tree."""
    _, expected, target = reference
    got = torch.func.grad(lambda q: poisson_nll(nbfunc.simulate(q), target))(tiny)
    for path, a in leaves_dict(got).items():
        assert_close_scaled(a, leaves_dict(expected)[path], 1e-9, path, atol=1e-300)


def test_partials_choice(tiny):
    """The pixel partials for square or Gaussian spots without an HKL file, with any number
    of sources and orientations, within the memory budget (which counts 9 rows per
    orientation, with several sources 5 per path, and the Gaussian shapes' own rows);
    otherwise the kernel's own derivatives."""
    plan, _ = nbfunc.render.make_plan(tiny)
    choice = nbfunc.render.partials_apply
    for more in ({}, {"n_orient": 3}, {"n_sources": 2}, {"n_sources": 2, "n_orient": 50}):
        many = dataclasses.replace(plan, block=1 << 20, **more)
        rows = pixel_rows(many.thicksteps > 1, many.polarization, many.n_orient,
                          many.n_paths if many.n_sources > 1 else 0, many.n_sources > 1)
        budget_pixels = nbfunc.render.PARTIALS_BUDGET // (rows * 8)
        assert choice(many, budget_pixels, 8, False), more
        assert not choice(many, budget_pixels + 1, 8, False), more
        assert choice(many, budget_pixels + 1, 4, False), more
    square = pixel_rows(plan.thicksteps > 1, plan.polarization)
    for shape, extra in (("gauss", 13), ("gauss_hkl", 4)):
        spots = dataclasses.replace(plan, shape=shape)
        rows = pixel_rows(plan.thicksteps > 1, plan.polarization, shape=shape)
        assert rows == square + extra
        budget_pixels = nbfunc.render.PARTIALS_BUDGET // (rows * 8)
        assert choice(spots, budget_pixels, 8, False)
        assert not choice(spots, budget_pixels + 1, 8, False)
    assert not choice(plan, 16, 8, True)
    for other in ({"shape": "round"}, {"shape": "tophat"}, {"curved": True}, {"absorption": True},
                  {"dmin": 1e-10}, {"ordered": True}, {"diffuse_ops": 1}, {"bfactor": True}):
        assert not choice(dataclasses.replace(plan, **other), 16, 8, False), other


@pytest.mark.slow
@needs_compile
def test_compiled_autograd_equals_transform_gradient_with_many_paths(input_files, aot_eager):
    """Several sources (paths) and several orientations: ``.backward()`` through the compiled
    pixel partial sums of several sources and orientations (one tree with both: one compile
    instead of two). Traced by
    dynamo and AOT autograd as inductor's input is (``aot_eager``): inductor's own code for
    this graph took 128 s of the test command's 10 minutes; its output is checked on the
    single-path kernel above (`test_autograd_through_the_wrapper_equals_transform_gradient`,
    `test_inductor_compiled_gradient_equals_eager`)."""
    p = make_params(CONFIGS["mosaic_phi"][0] + " " + CONFIGS["divergence_dispersion"][0], input_files)
    with eager_mode():
        target = (nbfunc.simulate(p) * 1.1).detach()
        expected = torch.func.grad(lambda q: poisson_nll(nbfunc.simulate(q), target))(p)
    assert_autograd_matches(p, target, expected, 1e-9, float_only=True)


# --------------------------------------------------------------------------------------------
# wrapper logic, with a stand-in for torch.compile
# --------------------------------------------------------------------------------------------
@pytest.fixture
def wrapper_on(monkeypatch):
    """Make `compiled` wrap functions even under NANOBRAGG_DISABLE_COMPILE=1; not strict."""
    monkeypatch.setattr(nbcompile, "COMPILE_DISABLED", False)
    monkeypatch.setattr(nbcompile, "COMPILE_STRICT", False)
    calls = []

    def broken_compile(fn, **options):
        calls.append(options)

        def run(*args, **kwargs):
            raise RuntimeError("backend exploded\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    return calls


def _double(x):
    return 2 * x


def test_compile_failure_is_a_runtime_warning_then_eager(wrapper_on):
    f = nbcompile.compiled(_double)
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed for _double \(RuntimeError: "
                                            r"backend exploded\); running it eagerly"):
        assert torch.equal(f(x), 2 * x)
    assert wrapper_on == [{"dynamic": False}]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(f(x), 2 * x)      # eager from now on, no second warning
    assert len(wrapper_on) == 1


def test_strict_mode_raises(wrapper_on, monkeypatch):
    monkeypatch.setattr(nbcompile, "COMPILE_STRICT", True)
    f = nbcompile.compiled(_double)
    with pytest.raises(nbcompile.CompileError, match="_double: backend exploded"):
        f(torch.ones(2))


@pytest.fixture
def recording_compile(monkeypatch):
    """A stand-in torch.compile that returns the function itself and records, per call made,
    whether each positional argument was a vmap-batched tensor."""
    monkeypatch.setattr(nbcompile, "COMPILE_DISABLED", False)
    monkeypatch.setattr(nbcompile, "COMPILE_STRICT", False)
    calls = []

    def fake_compile(fn, **options):
        def run(*args, **kwargs):
            calls.append([torch._C._functorch.is_batchedtensor(a) for a in args])
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def _cube_sum(x, y):
    return {"b": x**3 * y, "a": (x * y).sum()}


def test_grad_goes_through_the_compiled_function_and_double_backward_works(recording_compile):
    f = nbcompile.compiled(_cube_sum)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = f(x, x)                              # the same tensor in two places
    assert recording_compile == [[False, False]]   # the compiled function ran under autograd
    (g,) = torch.autograd.grad(out["b"].sum() + out["a"], x, create_graph=True)
    assert torch.allclose(g, 4 * x**3 + 2 * x)  # d/dx (x^4 + x^2)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.allclose(h, 12 * x**2 + 2)
    (g1,) = torch.autograd.grad(f(x, x)["b"].sum(), x)   # first order, no create_graph
    assert torch.allclose(g1, 4 * x**3)


@needs_compile
def test_double_backward_through_a_really_compiled_function():
    """With torch.compile itself (whose graphs cannot be differentiated twice): grad-of-grad,
    also by ``.backward()`` (which runs every node of the first backward's graph, the
    compiled one's too), gradgradcheck, and a backward run twice on a retained graph."""
    f = nbcompile.compiled(_cube_sum)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = f(x, x)
    (g,) = torch.autograd.grad(out["b"].sum() + out["a"], x, create_graph=True)
    torch.testing.assert_close(g, 4 * x**3 + 2 * x)
    (h,) = torch.autograd.grad(g.sum(), x, retain_graph=True)
    torch.testing.assert_close(h, 12 * x**2 + 2)
    g.sum().backward()   # reaches every node of the first backward's graph
    torch.testing.assert_close(x.grad, 12 * x.detach()**2 + 2)
    x.grad = None
    loss = f(x, x)["b"].sum()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 8 * x.detach()**3)
    assert torch.autograd.gradgradcheck(lambda t: f(t, t)["b"], (x,))


def _unwrapped(calls) -> bool:
    """Every recorded call received plain tensors (no transform was active)."""
    return all(not any(flags) for flags in calls)


def test_transforms_run_compiled_derived_functions(recording_compile):
    """grad, jacfwd, jacrev, hessian, jvp and vmap of grad call compiled functions (the
    function and the ones torch.func derives from it), always with plain tensors: torch.func
    peels every transform level before the compiled code runs."""
    f = nbcompile.compiled(_cube_sum)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    y = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)

    def loss(t):
        out = f(t, y)
        return out["b"].sum() + out["a"]

    torch.testing.assert_close(torch.func.grad(loss)(x), 3 * x**2 * y + y)
    torch.testing.assert_close(torch.func.jacfwd(lambda t: f(t, y)["b"])(x), torch.diag(3 * x**2 * y))
    torch.testing.assert_close(torch.func.jacrev(lambda t: f(t, y)["b"])(x), torch.diag(3 * x**2 * y))
    torch.testing.assert_close(torch.func.hessian(loss)(x), torch.diag(6 * x * y))
    _, tangent = torch.func.jvp(lambda t: f(t, y)["b"], (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, 3 * x**2 * y)
    grid = torch.stack([x, 2 * x])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(grid), 3 * grid**2 * y + y)
    assert len(recording_compile) >= 6
    assert _unwrapped(recording_compile)


def test_compile_failure_under_a_transform_is_reported_then_eager(wrapper_on):
    f = nbcompile.compiled(_double)
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for _double"):
        assert torch.equal(torch.func.grad(lambda t: f(t).sum())(x), torch.full((3,), 2.0))
    assert torch.equal(torch.func.jacfwd(f)(x), 2 * torch.eye(3))


def test_plain_vmap_runs_the_batched_function_compiled(recording_compile):
    f = nbcompile.compiled(_cube_sum)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    y = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = torch.func.vmap(f, in_dims=(0, None))(x, y)
    assert recording_compile == [[False, False]]     # one call of the batched function
    assert torch.equal(out["b"], x**3 * y)
    assert torch.equal(out["a"], (x * y).sum(1))


def test_vmap_of_tensors_that_need_a_gradient_runs_the_batched_function(recording_compile):
    f = nbcompile.compiled(_cube_sum)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    out = torch.func.vmap(f, in_dims=(0, None))(x, torch.ones(2, dtype=torch.float64))
    assert recording_compile == [[False, False]]   # one call of the batched function
    (g,) = torch.autograd.grad(out["b"].sum(), x)
    assert torch.equal(g, 3 * x.detach() ** 2)
    assert _unwrapped(recording_compile)


@pytest.mark.slow
@needs_compile
def test_compiled_vmap_of_renders_equals_the_loop(tiny):
    """Under vmap the set-up and the chunk kernel run batched and compiled (the same formulas
    as the loop's, compiled for a batch, may sum in another order), so the two agree to
    rounding, not bit for bit."""
    changes = [{}, {"crystal.cell_a": torch.tensor(52.0, dtype=torch.float64),
                    "detector.distance": torch.tensor(55.0, dtype=torch.float64)}]
    members = [nbfunc.replace_leaves(tiny, c) for c in changes]
    with torch.no_grad():
        batched = torch.func.vmap(nbfunc.simulate)(nbfunc.stack(members))
        looped = torch.stack([nbfunc.simulate(m) for m in members])
    # absolute part: pixels between reflections (1e-10 of the peak) carry the grating's
    # cancellation, so their own relative rounding is larger
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12 * float(looped.abs().max()))


def test_compile_error_at_wrap_time_is_reported(monkeypatch):
    monkeypatch.setattr(nbcompile, "COMPILE_DISABLED", False)
    monkeypatch.setattr(nbcompile, "COMPILE_STRICT", False)

    def unavailable(fn, **options):
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", unavailable)
    f = nbcompile.compiled(_double)
    with pytest.warns(RuntimeWarning, match="not supported on this platform"):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))


# --------------------------------------------------------------------------------------------
# environment flags
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["NANOBRAGG_DISABLE_COMPILE", "NANOBRAGG_COMPILE_STRICT"])
@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), (" YES ", True), ("on", True),
                                        ("0", False), ("false", False), ("No", False), ("", False)])
def test_flag_spellings(monkeypatch, name, raw, value):
    monkeypatch.setenv(name, raw)
    assert nbcompile._read_flag(name, not value) is value


@pytest.mark.parametrize("name", ["NANOBRAGG_DISABLE_COMPILE", "NANOBRAGG_COMPILE_STRICT"])
def test_flag_unset_gives_default(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert nbcompile._read_flag(name, True) is True
    assert nbcompile._read_flag(name, False) is False


@pytest.mark.parametrize("name", ["NANOBRAGG_DISABLE_COMPILE", "NANOBRAGG_COMPILE_STRICT"])
@pytest.mark.parametrize("raw", ["2", "maybe", "enable", "-1"])
def test_unknown_flag_values_are_rejected(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=rf"{name}='{raw}' is not understood; use 1 \(on\) or 0 \(off\)"):
        nbcompile._read_flag(name, False)


@run_once
def test_unknown_flag_value_stops_the_first_render_not_the_import():
    """``import nbfunc`` succeeds; the first render raises one line naming the variable."""
    env = {**os.environ, "NANOBRAGG_DISABLE_COMPILE": "maybe"}
    code = ("import nbfunc\n"
            "from nbfunc.cli.derive import params_from_args\n"
            "p = params_from_args('-cell 50 50 50 90 90 90 -default_F 1 -detpixels 4'.split())\n"
            "try:\n    nbfunc.simulate(p)\nexcept ValueError as err:\n    print(err)\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ("NANOBRAGG_DISABLE_COMPILE='maybe' is not understood; "
                                  "use 1 (on) or 0 (off)")


@run_once
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("extra, expected", [({}, "True"), ({"NANOBRAGG_KEEP_FREED_MEMORY": "0"}, "False"),
                                             ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "False")])
def test_keep_freed_memory_flag(extra, expected):
    """glibc's thresholds are set at import unless turned off or set by the user."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NANOBRAGG_KEEP_FREED_MEMORY", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}
    run = subprocess.run([sys.executable, "-c", "import nbfunc.compile as c; print(c.KEEPS_FREED_MEMORY)"],
                         env={**env, **extra}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected
