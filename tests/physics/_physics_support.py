"""Helpers shared by the physics tests: central differences of a function of a tree, and a
tolerance check scaled to the largest expected value."""
from __future__ import annotations

import torch

from nbfunc import Params
from nbfunc.tree import get_leaf, replace_leaves


def central(fn, p: Params, path: str, rel: float = 1e-6) -> torch.Tensor:
    """d fn(p) / d leaf by central differences, shape ``fn(p).shape + leaf.shape``."""
    leaf = get_leaf(p, path)
    flat = leaf.reshape(-1)
    cols = []
    for i in range(flat.numel()):
        step = rel * max(abs(float(flat[i])), 1.0)
        delta = torch.zeros_like(flat)
        delta[i] = step
        plus = fn(replace_leaves(p, {path: (flat + delta).reshape(leaf.shape)}))
        minus = fn(replace_leaves(p, {path: (flat - delta).reshape(leaf.shape)}))
        cols.append((plus - minus) / (2 * step))
    out = torch.stack(cols, -1)
    return out.reshape(out.shape[:-1] + leaf.shape)


def close(actual, expected, rtol, what=""):
    """``max|actual - expected| <= rtol * max|expected|``, else an assertion naming ``what``."""
    err = float((actual - expected).abs().max())
    bound = rtol * float(expected.abs().max())
    assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e}"
