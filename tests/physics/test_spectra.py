"""Per-source weights (spectra): ones change nothing, a weight scales its source's term, a
spectrum is the weighted mean of its channels, and the weights' derivatives are right.

Every tree is float64 on 8 x 8 pixels with one phi step and one mosaic domain, rendered eagerly.
"""
import pytest
import torch

import nbfunc
from nbfunc.io.spectrum import gaussian_spectrum, spectrum_sources
from nbfunc.params import SourceList
from nbfunc.render import make_plan, partials_apply
from nbfunc.tree import replace_leaves

D = torch.float64
FLAGS = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
         "-distance 50 -pixel 0.5 -detpixels 8 -oversample 1")


@pytest.fixture(scope="module")
def plain():
    from nbfunc.cli.derive import params_from_args
    return params_from_args(FLAGS.split())


def with_sources(p, wavelengths, weights=None, water: float = 0.0):
    """``p`` with sources along its beam at ``wavelengths`` (Angstrom), weights as given."""
    sources = spectrum_sources(wavelengths, torch.ones(len(wavelengths), dtype=D), p.beam.beam_vector,
                               normalize=False)
    if weights is not None:
        sources = sources.model_copy(update={"weights": torch.as_tensor(weights, dtype=D)})
    crystal = p.crystal.model_copy(update={"water_size": torch.tensor(water, dtype=D)})
    return p.model_copy(update={"beam": p.beam.model_copy(update={"sources": sources}),
                                "crystal": crystal})


def test_default_weights_are_ones_of_the_wavelengths_dtype():
    listed = SourceList(directions=torch.tensor([[-1.0, 0, 0]] * 2, dtype=torch.float32),
                        wavelengths=torch.tensor([1.0, 1.1], dtype=torch.float32))
    assert listed.weights.dtype == torch.float32 and torch.equal(listed.weights, torch.ones(2))


def test_a_single_listed_source_of_weight_one_is_the_plain_render(plain):
    """One source along the beam at the beam's wavelength is the default beam, bit for bit
    (the weight, 1, is folded into the scale as an exact product)."""
    reference = nbfunc.simulate(plain)
    listed = nbfunc.simulate(with_sources(plain, [1.0]))
    assert torch.equal(listed, reference)


def test_explicit_ones_equal_the_default_weights(plain):
    p = with_sources(plain, [0.98, 1.0, 1.03], water=5.0)
    ones = replace_leaves(p, {"beam.sources.weights": torch.ones(3, dtype=D)})
    assert torch.equal(nbfunc.simulate(ones), nbfunc.simulate(p))


def test_weight_two_doubles_a_single_source_image(plain):
    p = with_sources(plain, [1.0])
    doubled = nbfunc.simulate(with_sources(plain, [1.0], [2.0]))
    assert torch.equal(doubled, 2 * nbfunc.simulate(p))  # times 2 is exact in binary


def test_two_channels_are_the_weighted_mean_of_single_renders(plain):
    """``I = (w1 I1 + w2 I2) / 2``: each channel's photons times its weight, over the number
    of sources (nanoBragg's steps)."""
    w = (0.5, 1.5)
    single = [nbfunc.simulate(with_sources(plain, [lam])) for lam in (0.97, 1.02)]
    both = nbfunc.simulate(with_sources(plain, [0.97, 1.02], w))
    expected = (w[0] * single[0] + w[1] * single[1]) / 2
    # the two renders sum the same terms in another order: rounding of a few ulp
    assert torch.allclose(both, expected, rtol=1e-13, atol=0)
    assert float(single[0].sub(single[1]).abs().max()) > 1e-3 * float(expected.max())


def test_the_water_background_is_not_weighted(plain):
    """The background is added once per pixel (and divided by the steps, as in nanoBragg),
    whatever the weights: image(water) - image(dry) does not depend on them."""
    lams = [0.97, 1.02]
    background = [nbfunc.simulate(with_sources(plain, lams, w, water=5.0))
                  - nbfunc.simulate(with_sources(plain, lams, w)) for w in ((0.5, 1.5), (2.0, 3.0))]
    assert float(background[0].min()) > 0
    assert torch.allclose(background[0], background[1], rtol=1e-9, atol=0)


def test_path_blocks_weight_their_own_sources(plain):
    """With chunks smaller than a pixel's paths every block carries its own weights."""
    lam, w = gaussian_spectrum(1.0, 7, fwhm=0.02)
    p = with_sources(plain, lam, w * torch.linspace(0.5, 1.5, 7, dtype=D))
    small = p.model_copy(update={"sampling": p.sampling.model_copy(update={"chunk": 2})})
    assert make_plan(small)[0].block == 2
    assert torch.allclose(nbfunc.simulate(small), nbfunc.simulate(p), rtol=1e-13, atol=0)


def test_single_source_weight_gradient_uses_the_partial_sums(plain):
    """The plain configuration with one listed source takes `PartialsRules`; its gradient in
    the weight is image / weight (the image is linear in it, no water)."""
    p = with_sources(plain, [1.0], [1.5])
    plan, pixels = make_plan(p)
    assert partials_apply(plan, len(pixels), 8, False)
    w = p.beam.sources.weights.clone().requires_grad_(True)
    image = nbfunc.simulate(replace_leaves(p, {"beam.sources.weights": w}))
    (grad,) = torch.autograd.grad(image.sum(), w)
    assert torch.allclose(grad, image.detach().sum() / 1.5, rtol=1e-12)


def test_weight_jacobians_match_central_differences(plain):
    """jacfwd and jacrev in the weights of a three-channel spectrum with water: column s is
    the s-th channel's crystal term over 3, checked against central differences."""
    p = with_sources(plain, [0.98, 1.0, 1.03], [0.7, 1.0, 1.3], water=5.0)
    w0 = p.beam.sources.weights

    def image(w):
        return nbfunc.simulate(replace_leaves(p, {"beam.sources.weights": w}))

    step = 0.25  # the image is linear in the weights: central differences are exact but for rounding
    columns = [(image(w0 + step * e) - image(w0 - step * e)) / (2 * step) for e in torch.eye(3, dtype=D)]
    numeric = torch.stack(columns, -1)
    for jac in (torch.func.jacfwd(image)(w0), torch.func.jacrev(image)(w0)):
        assert torch.allclose(jac, numeric, rtol=1e-6, atol=1e-6 * float(numeric.abs().max()))
