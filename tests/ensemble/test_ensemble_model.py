"""Shots, the total likelihood and its gradients (reverse mode, vmap, Jacobian blocks)."""
import pytest
import torch

from _ensemble_support import truth
from nbfunc.ensemble.model import (make_ensemble, make_shot, shot_blocks, shot_deviance,
                                   shot_value_and_grad, stacked_value_and_grad, tree_nll, touched)
from nbfunc.tree import replace_leaves

FREE = ["crystal.misset", "crystal.Na"]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    return truth(n_shots=2, pixels=8)


def central(fn, x, i, h):
    up, down = x.clone(), x.clone()
    up[i] += h
    down[i] -= h
    return (fn(up) - fn(down)) / (2 * h)


class TestGradients:
    def test_amplitude_and_leaf_gradients_match_differences(self, setup):
        amap, f_true, shots = setup
        shot = shots[0]
        f = f_true * 1.1
        value, g_tree, g_f = shot_value_and_grad(shot, amap, f)
        nll = lambda x: tree_nll(shot.params, x, shot.counts, shot.include, amap.index)
        assert torch.isclose(value, nll(f))
        for i in touched(shot, amap, [], torch.zeros(0))[:3].tolist():
            torch.testing.assert_close(g_f[i], central(nll, f, i, 1e-3), rtol=1e-6, atol=1e-8)
        misset = shot.params.crystal.misset
        by_misset = lambda m: tree_nll(replace_leaves(shot.params, {"crystal.misset": m}), f,
                                       shot.counts, shot.include, amap.index)
        torch.testing.assert_close(g_tree.crystal.misset[1], central(by_misset, misset, 1, 1e-5),
                                   rtol=1e-5, atol=1e-6)
        assert g_tree.crystal.Na.shape == () and torch.isfinite(g_tree.crystal.Na)

    def test_untouched_amplitudes_have_zero_gradient(self, setup):
        amap, f_true, shots = setup
        _, _, g_f = shot_value_and_grad(shots[0], amap, f_true)
        seen = torch.zeros(amap.n_asu, dtype=torch.bool)
        seen[touched(shots[0], amap, [], torch.zeros(0))] = True
        assert (g_f[~seen] == 0).all() and (g_f[seen] != 0).any()

    def test_vmap_equals_loop(self, setup):
        amap, f_true, shots = setup
        values, g_tree, g_f = stacked_value_and_grad(shots, amap, f_true)
        for k, shot in enumerate(shots):
            v, t, f = shot_value_and_grad(shot, amap, f_true)
            torch.testing.assert_close(values[k], v)
            torch.testing.assert_close(g_f[k], f)
            torch.testing.assert_close(g_tree.crystal.misset[k], t.crystal.misset)

    def test_mask_leaves_pixels_out(self, setup):
        amap, f_true, shots = setup
        shot = shots[0]
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[:4] = True
        half = make_shot(0, shot.params, shot.counts, amap, mask)
        edited = make_shot(0, shot.params, torch.where(mask, shot.counts, 1e6), amap, mask)
        assert torch.isclose(shot_value_and_grad(half, amap, f_true)[0],
                             shot_value_and_grad(edited, amap, f_true)[0])


class TestBlocks:
    def test_block_gradient_is_the_deviance_gradient(self, setup):
        amap, f_true, shots = setup
        ens = make_ensemble(amap, shots, 2, FREE, f_true)
        shot, theta = shots[1], ens.start.thetas[1]
        f = f_true * 0.9
        blk = shot_blocks(shot, amap, ens.free, f, theta)
        t = len(blk.cols)
        g_f, g_t = torch.func.grad(lambda x, th: shot_deviance(shot, amap, ens.free, x, th)[0],
                                   argnums=(0, 1))(f, theta)
        torch.testing.assert_close(blk.terms.grad[:t], g_f[blk.cols])
        torch.testing.assert_close(blk.terms.grad[t:], g_t)
        info = blk.terms.fisher
        assert info.shape == (t + 4, t + 4) and torch.allclose(info, info.T)
        assert bool((torch.linalg.eigvalsh(info) > -1e-9 * info.diagonal().max()).all())


    def test_amplitude_curvature_is_the_hessian_diagonal(self, setup):
        amap, f_true, shots = setup
        shot, f = shots[0], f_true * 0.8
        blk = shot_blocks(shot, amap, [], f, torch.zeros(0, dtype=torch.float64))
        cols = blk.cols[:6]
        dev = lambda x: shot_deviance(shot, amap, [], f.index_copy(0, cols, x),
                                      torch.zeros(0, dtype=torch.float64))[0]
        hessian = torch.func.jacfwd(torch.func.grad(dev))(f[cols])
        ours = blk.curvature[:6]
        torch.testing.assert_close(ours, hessian.diagonal(), rtol=1e-8, atol=0)


class TestInput:
    def test_counts_of_the_wrong_shape(self, setup):
        amap, _, shots = setup
        with pytest.raises(ValueError, match=r"shot 4: counts have shape \(3, 3\)"):
            make_shot(4, shots[0].params, torch.zeros(3, 3), amap)

    def test_negative_counts(self, setup):
        amap, _, shots = setup
        with pytest.raises(ValueError, match="finite and >= 0"):
            make_shot(0, shots[0].params, -torch.ones(8, 8), amap)

    def test_mask_of_the_wrong_shape(self, setup):
        amap, _, shots = setup
        with pytest.raises(ValueError, match="mask has shape"):
            make_shot(0, shots[0].params, torch.zeros(8, 8), amap, torch.ones(2, 2))

    def test_amplitudes_are_not_per_shot(self, setup):
        amap, f_true, shots = setup
        with pytest.raises(ValueError, match="crystal.fhkl cannot be a per-shot free leaf"):
            make_ensemble(amap, shots, 2, ["crystal.fhkl"], f_true)

    def test_zero_start(self, setup):
        amap, f_true, shots = setup
        with pytest.raises(ValueError, match="non-zero"):
            make_ensemble(amap, shots, 2, FREE, torch.zeros_like(f_true))

    def test_restraint_on_a_fixed_leaf(self, setup):
        amap, f_true, shots = setup
        with pytest.raises(ValueError, match="not refined"):
            make_ensemble(amap, shots, 2, FREE, f_true, {"detector.distance": 1.0})

    def test_restraint_widths(self, setup):
        amap, f_true, shots = setup
        ens = make_ensemble(amap, shots, 2, FREE, f_true, {"crystal.misset": 0.1,
                                                          "crystal.misset[2]": 0.2, "F": 5.0})
        assert ens.theta_sigma.tolist()[:3] == [0.1, 0.1, 0.2]
        assert ens.theta_sigma[3] == float("inf") and bool((ens.f_sigma == 5.0).all())


def test_blocks_without_free_elements(setup):
    amap, f_true, shots = setup
    ens = make_ensemble(amap, shots, 2, [], f_true)
    blk = shot_blocks(shots[0], amap, ens.free, f_true, ens.start.thetas[0])
    assert ens.start.thetas[0].shape == (0,) and blk.terms.fisher.shape == (len(blk.cols),) * 2
