"""Choose per-layer thresholds that meet a global MLP-FLOPs budget at the least estimated loss.

Three dials per layer: the input threshold (gate/up skip input channels with tiny |x|, TEAL-style, exact given x),
the router mass threshold t (experts, XMoE rule; t = 1 runs no router) and the down threshold (skip down rows whose
|h| * ||down row|| is tiny inside the chosen experts, exact given h). For every combination on a grid we measure, on
held-out calibration tokens, the MLP multiply-adds and an output error: the exact error of the input sparsity plus
the squared output norms of the experts and neurons left out. Each layer's error is weighted by its loss
sensitivity (mean squared gradient of the LM loss w.r.t. that FFN's output, a diagonal Fisher), so errors in
different layers are compared by what they cost in loss. A Lagrangian sweep then picks one combination per layer so
that the total FLOPs meet the target at the least weighted error; layers differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from densesparse.flops import mlp_macs_dense, mlp_macs_sparse
from densesparse.router import norms_from_hidden
from densesparse.runtime import SparseMLP, threshold_select

INPUT_GRID = (0.0, 0.15, 0.3, 0.45, 0.6)  # quantiles of |x| dropped
MASS_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
RHO_GRID = (0.0, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)  # quantiles of neuron contributions dropped in down
QUANTILE_SAMPLE = 1 << 22


@dataclass
class Point:
    macs: float
    err: float
    threshold: float
    down_tau: float
    input_tau: float
    recall: float


def _quantiles(values: torch.Tensor, qs) -> list[float]:
    flat = values.flatten()
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:QUANTILE_SAMPLE]]
    flat = flat.sort().values
    return [float(flat[min(int(q * flat.numel()), flat.numel() - 1)]) if q > 0 else 0.0 for q in qs]


@torch.no_grad()
def layer_points(mlp: SparseMLP, x: torch.Tensor, weight: float, down_skip: bool, input_skip: bool = True
                 ) -> list[Point]:
    x = x.float()
    n, d = x.shape
    gu = 2 if mlp.gated else 1
    w_down_t, b_down = mlp.canonical()[4:]
    norms = mlp.down_norms()
    h_full = mlp.hidden_states(x)
    y_full = F.linear(h_full, w_down_t.t())
    logits = mlp.router.float()(x)
    selections = {t: threshold_select(logits, t) for t in MASS_GRID}
    taus = _quantiles(h_full.abs() * norms, RHO_GRID if down_skip else (0.0,))
    tau_t = torch.tensor(taus)
    x_taus = _quantiles(x.abs(), INPUT_GRID if input_skip else (0.0,))
    points = [Point(mlp_macs_dense(d, mlp.intermediate, mlp.gated), 0.0, 1.0, 0.0, 0.0, 1.0)]
    for x_tau in x_taus:
        keep_x = x.abs() >= x_tau
        n_in = keep_x.sum(1).float()
        h = mlp.hidden_states(x * keep_x) if x_tau > 0 else h_full
        input_err = float((F.linear(h, w_down_t.t()) - y_full).pow(2).sum()) / n if x_tau > 0 else 0.0
        contrib = h.abs() * norms
        true = norms_from_hidden(mlp, h)
        total_mass = true.sum(1).clamp_min(1e-12)
        for t, sel in selections.items():
            dropped_expert_err = float((true.pow(2) * ~sel).sum()) / n
            recall = float(((true * sel).sum(1) / total_mass).mean())
            rows = mlp.n_shared + sel.sum(1).float() * mlp.expert_size
            cells = float((rows * n_in).mean())
            # per down threshold, how many computed neurons survive and the squared mass of those that do not
            computed = contrib[mlp.neuron_mask(sel)]
            bins = torch.bucketize(computed, tau_t, right=True)
            below_sq = torch.zeros(len(taus) + 1, dtype=torch.float64).index_add_(0, bins, computed.double() ** 2)
            below_n = torch.bincount(bins, minlength=len(taus) + 1)
            router = mlp.router.macs() if t < 1.0 else 0
            for i, tau in enumerate(taus):
                dropped_sq = float(below_sq[:i + 1].sum()) if tau > 0 else 0.0
                down = (computed.numel() - (int(below_n[:i + 1].sum()) if tau > 0 else 0)) / n
                err = input_err + dropped_expert_err + dropped_sq / n
                macs = mlp_macs_sparse(d, gu, cells, down, router)
                points.append(Point(macs, err * weight, t, tau, x_tau, recall))
    return points


def allocate(per_layer: list[list[Point]], target: float) -> list[Point]:
    """One point per layer: least total error with total MACs <= target * dense MACs (Lagrangian sweep)."""
    macs = [torch.tensor([p.macs for p in pts], dtype=torch.float64) for pts in per_layer]
    errs = [torch.tensor([p.err for p in pts], dtype=torch.float64) for pts in per_layer]
    budget = target * sum(float(m[0]) for m in macs)

    def pick(lam: float) -> list[int]:
        return [int(torch.argmin(e + lam * m)) for e, m in zip(errs, macs)]

    def cost(choice: list[int]) -> float:
        return sum(float(m[i]) for m, i in zip(macs, choice))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget and hi < 1e12:
        hi *= 4.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if cost(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return [pts[i] for pts, i in zip(per_layer, pick(hi))]


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
            "input_tau": [p.input_tau for p in chosen],
            "calib_mlp_flops_kept": sum(p.macs for p in chosen) / dense,
            "calib_expert_recall": [round(p.recall, 4) for p in chosen],
        })
    return out
