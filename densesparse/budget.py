"""Choose per-layer thresholds that meet a global MLP-FLOPs budget at the least estimated error.

For every layer and every pair (router mass threshold t, down-skip quantile rho) we measure on held-out
calibration tokens the MLP multiply-adds kept and an error estimate: the squared output norm of the experts and
neurons left out, relative to the residual stream's squared norm at that layer. A Lagrangian sweep then picks one
pair per layer so the total FLOPs meet the target while the summed error is smallest; layers therefore differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from densesparse.flops import mlp_macs_dense, mlp_macs_sparse
from densesparse.router import expert_output_norms
from densesparse.runtime import SparseMLP, threshold_select

MASS_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
RHO_GRID = (0.0, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)
QUANTILE_SAMPLE = 1 << 22


@dataclass
class Point:
    macs: float
    err: float
    threshold: float
    down_tau: float
    recall: float


@torch.no_grad()
def layer_points(mlp: SparseMLP, x: torch.Tensor, resid_sq: float, down_skip: bool) -> list[Point]:
    x = x.float()
    d = mlp.hidden
    gu = 2 if mlp.gated else 1
    h = mlp.hidden_states(x)
    contrib = h.abs() * mlp.down_norms()
    true = expert_output_norms(mlp, x)
    logits = mlp.router.float()(x)
    flat = contrib.flatten()
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:QUANTILE_SAMPLE]]
    rhos = RHO_GRID if down_skip else (0.0,)
    taus = [float(torch.quantile(flat, r)) if r > 0 else 0.0 for r in rhos]
    points = [Point(mlp_macs_dense(d, mlp.intermediate, mlp.gated), 0.0, 1.0, 0.0, 1.0)]
    total_mass = true.sum(1).clamp_min(1e-12)
    for t in MASS_GRID:
        sel = threshold_select(logits, t)
        dropped_expert_err = (true.pow(2) * ~sel).sum(1).mean()
        recall = float(((true * sel).sum(1) / total_mass).mean())
        keep = mlp.neuron_mask(sel)
        n_sel = sel.sum(1).float().mean()
        for tau in taus:
            kept = keep & (contrib >= tau) if tau > 0 else keep
            err = dropped_expert_err + (contrib.pow(2) * (keep & ~kept)).sum(1).mean()
            macs = mlp_macs_sparse(d, mlp.n_shared, mlp.expert_size, gu, float(n_sel), float(kept.sum(1).float().mean()),
                                   mlp.router.macs())
            points.append(Point(macs, float(err) / resid_sq, t, tau, recall))
    return points


def allocate(per_layer: list[list[Point]], target: float) -> list[Point]:
    """One point per layer: least total error with total MACs <= target * dense MACs (Lagrangian sweep)."""
    dense = sum(p[0].macs for p in per_layer)
    budget = target * dense

    def pick(lam: float) -> list[Point]:
        return [min(pts, key=lambda p: p.err + lam * p.macs) for pts in per_layer]

    lo, hi = 0.0, 1.0
    while sum(p.macs for p in pick(hi)) > budget and hi < 1e12:
        hi *= 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(p.macs for p in pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def budget_grid(min_budget: float) -> list[float]:
    grid, t = [], 0.95
    while t >= min_budget - 1e-9:
        grid.append(round(t, 4))
        t -= 0.05
    if not grid or grid[-1] > min_budget:
        grid.append(min_budget)
    return sorted(grid)


def calibrate_budgets(per_layer: list[list[Point]], min_budget: float) -> list[dict]:
    dense = sum(p[0].macs for p in per_layer)
    out = []
    for target in budget_grid(min_budget):
        chosen = allocate(per_layer, target)
        out.append({
            "target": target,
            "thresholds": [p.threshold for p in chosen],
            "down_tau": [p.down_tau for p in chosen],
            "calib_mlp_flops_kept": sum(p.macs for p in chosen) / dense,
            "calib_expert_recall": [round(p.recall, 4) for p in chosen],
        })
    return out
