"""Figures of an uncertainty analysis: correlation heatmap, covariance ellipses, pull histograms.

matplotlib is an optional dependency (the ``plot`` extra: ``pip install nbfunc[plot]``); it is
imported when a figure is drawn. Each function writes
one PNG and returns its path; figures are built with ``matplotlib.figure.Figure``, so no
pyplot state or display backend is involved.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from nbfunc.uncertainty import Uncertainty


def _figure(**kwargs):
    """A new ``matplotlib.figure.Figure`` (no pyplot, no global state), or an ImportError that
    says how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("nbfunc.plots needs matplotlib, which is not installed; install the "
                          "plot extra: pip install 'nbfunc[plot]' (or pip install matplotlib)") from err
    return Figure(**kwargs)


def short_names(names: Sequence[str]) -> list[str]:
    """Leaf names without their group: ``"detector.distance"`` -> ``"distance"``.

    >>> short_names(["crystal.misset[0]", "detector.beam_center_f"])
    ['misset[0]', 'beam_center_f']
    """
    return [n.split(".")[-1] for n in names]


def correlation_heatmap(u: Uncertainty, path: str | Path, title: str = "correlation") -> Path:
    """Heatmap of ``u.correlation`` (n, n) with the values written in the cells."""
    n = len(u.names)
    labels = short_names(u.names)
    fig = _figure(figsize=(1.0 + 0.62 * n, 0.6 + 0.55 * n))
    ax = fig.subplots()
    image = ax.imshow(u.correlation.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(n):
        for j in range(n):
            value = float(u.correlation[i, j])
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_title(f"{title} (condition number {u.condition_number:.3g})", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def ellipse(covariance: torch.Tensor, sigmas: float = 1.0, points: int = 100) -> torch.Tensor:
    """Points (points, 2) of the ``sigmas``-standard-deviation ellipse of a 2x2 covariance.

    >>> ellipse(torch.eye(2, dtype=torch.float64), 2.0, 4).round(decimals=6).abs().max()
    tensor(2., dtype=torch.float64)
    """
    values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    angle = torch.linspace(0, 2 * math.pi, points, dtype=torch.float64)
    circle = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return sigmas * circle * torch.sqrt(values.clamp(min=0)) @ vectors.T


def corner_plot(u: Uncertainty, path: str | Path, samples: torch.Tensor | None = None,
                center: torch.Tensor | None = None) -> Path:
    """Pairwise 1- and 2-sigma covariance ellipses in units of each parameter's std.

    Args:
        u: the uncertainty whose ``covariance`` is drawn (finite entries only).
        samples: optional (R, n) fitted values (e.g. of replicas) drawn as points.
        center: (n,) centre of the ellipses (default ``u.values``).
    """
    n = len(u.names)
    labels = short_names(u.names)
    center = u.values if center is None else center
    std = torch.where(torch.isfinite(u.std) & (u.std > 0), u.std, torch.ones_like(u.std))
    scaled_cov = u.covariance / (std[:, None] * std[None, :])
    fig = _figure(figsize=(1.45 * n, 1.45 * n))
    axes = fig.subplots(n, n, squeeze=False)
    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                _diagonal_panel(ax, samples, center, std, i)
            else:
                _pair_panel(ax, scaled_cov, samples, center, std, i, j)
            if i == n - 1:
                ax.set_xlabel(labels[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=7)
    fig.suptitle("covariance ellipses (1 and 2 std, axes in std units)", fontsize=9)
    return _save(fig, path, dpi=64)


def _diagonal_panel(ax, samples, center, std, i):
    x = torch.linspace(-4, 4, 200)
    ax.plot(x, torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi), color="C1")
    if samples is not None:
        ax.hist(((samples[:, i] - center[i]) / std[i]).numpy(), bins=20, range=(-4, 4), density=True,
                color="C0", alpha=0.6)
    ax.set_xlim(-4, 4)


def _pair_panel(ax, scaled_cov, samples, center, std, i, j):
    block = scaled_cov[[j, i]][:, [j, i]]
    if samples is not None:
        ax.scatter(((samples[:, j] - center[j]) / std[j]).numpy(),
                   ((samples[:, i] - center[i]) / std[i]).numpy(), s=1.5, color="C0", alpha=0.5)
    if bool(torch.isfinite(block).all()):
        for sig, style in ((1.0, "-"), (2.0, "--")):
            pts = ellipse(block, sig)
            ax.plot(pts[:, 0].numpy(), pts[:, 1].numpy(), style, color="C1", lw=1)
    ax.set_xlim(-4, 4)
    ax.set_ylim(-4, 4)


def pull_histograms(pulls: torch.Tensor, names: Sequence[str], path: str | Path,
                    title: str = "pulls (fit - truth)/std") -> Path:
    """One histogram per parameter of pulls (R, n), with the unit normal and mean/width."""
    n = len(names)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(figsize=(2.6 * cols, 2.1 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    x = torch.linspace(-4, 4, 200)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        p = pulls[:, k]
        ax.hist(p.numpy(), bins=24, range=(-4, 4), density=True, color="C0", alpha=0.7)
        ax.plot(x, torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi), color="C1")
        ax.set_title(f"{short_names([names[k]])[0]}\nmean {float(p.mean()):+.3f} width {float(p.std()):.3f}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}, {pulls.shape[0]} replicas", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path, dpi: int = 80) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
