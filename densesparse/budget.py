"""Choose per-layer thresholds that meet a global MLP-FLOPs budget at the least estimated loss.

Four dials per layer: the input threshold (gate/up skip input channels with tiny |x|, TEAL-style, exact given x),
the router mass threshold t (experts, XMoE rule; t = 1 runs no router), the gate threshold (gated FFNs: up and
down skip neurons whose |act(gate)| * E|up| * ||down row|| is tiny, CATS-style but scaled to the neuron's expected
output, exact given the gate) and the down threshold (skip down rows whose |h| * ||down row|| is tiny inside the
chosen experts, exact given h). Every combination on a grid is screened on held-out calibration tokens with its
MLP multiply-adds and a cheap error estimate (the exact error of the input sparsity plus the squared output norms
of the experts and neurons left out); the screened Pareto front is then re-scored with the exact output error of
its combined masks. Each layer's error is weighted by its loss sensitivity (mean squared gradient of the LM loss
w.r.t. that FFN's output, a diagonal Fisher), so errors in different layers are compared by what they cost in
loss. A Lagrangian sweep then picks one combination per layer so that the total FLOPs meet the target at the
least weighted error; layers differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from densesparse.flops import mlp_macs_dense, mlp_macs_sparse
from densesparse.router import norms_from_hidden
from densesparse.runtime import SparseMLP, apply_budget, threshold_select

INPUT_GRID = (0.0, 0.15, 0.3, 0.45, 0.6, 0.7, 0.8)  # quantiles of |x| dropped
MASS_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
GATE_GRID = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)  # quantiles of |act(gate)| * gate_scale dropped
RHO_GRID = (0.0, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)  # quantiles of neuron contributions dropped in down
QUANTILE_SAMPLE = 1 << 18  # thresholds need quantiles to ~0.2%, not exact sorts of millions
EXACT_POINTS = 96


@dataclass
class Point:
    macs: float
    err: float
    threshold: float
    down_tau: float
    input_tau: float
    recall: float
    gate_tau: float = 0.0
    # mean fraction of the routed experts the router selects per token on the calibration tokens (1 = router off);
    # the CUDA runtime picks its decode kernels by it (runtime.COMPACT_BELOW)
    experts: float = 1.0


def _quantiles(values: torch.Tensor, qs) -> list[float]:
    flat = values.flatten()
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:QUANTILE_SAMPLE]]
    flat = flat.sort().values
    return [float(flat[min(int(q * flat.numel()), flat.numel() - 1)]) if q > 0 else 0.0 for q in qs]


@torch.no_grad()
def layer_points(mlp: SparseMLP, x: torch.Tensor, weight: float, down_skip: bool, input_skip: bool = True
                 ) -> list[Point]:
    """The layer's (MACs, loss-weighted output error) trade-off over the four dials' grid."""
    x = x.float()
    n, d = x.shape
    w_down = mlp.canonical()[4].float().t()
    norms = mlp.down_norms()
    y_full = F.linear(mlp.hidden_states(x), w_down)
    logits = mlp.router.float()(x)
    selections = {t: threshold_select(logits, t) for t in MASS_GRID}
    expert_frac = {t: float(sel.float().mean()) for t, sel in selections.items()}
    # the shared neurons form group 0, always on; expert j is group j + 1
    group = torch.cat([torch.zeros(mlp.n_shared, dtype=torch.long),
                       1 + torch.arange(mlp.n_experts).repeat_interleave(mlp.expert_size)])
    groups = 1 + mlp.n_experts
    on = {t: torch.cat([torch.ones(n, 1, dtype=torch.bool), sel], 1) for t, sel in selections.items()}
    x_taus = _quantiles(x.abs(), INPUT_GRID if input_skip else (0.0,))
    cache, screened = {}, []
    for x_tau in x_taus:
        keep_x = x.abs() >= x_tau
        n_in = keep_x.sum(1).float()
        g, u = mlp.gate_and_up((x * keep_x).float())
        h = u if g is None else g * u
        input_err = float((F.linear(h, w_down) - y_full).pow(2).sum()) / n if x_tau > 0 else 0.0
        contrib = h.abs() * norms
        taus = _quantiles(contrib, RHO_GRID if down_skip else (0.0,))
        true = norms_from_hidden(mlp, h)
        total_mass = true.sum(1).clamp_min(1e-12)
        per_t = {t: (float((true.pow(2) * ~sel).sum()) / n, float(((true * sel).sum(1) / total_mass).mean()),
                     float(((mlp.n_shared + sel.sum(1) * mlp.expert_size) * n_in).mean()) if mlp.gated else 0.0,
                     mlp.router.macs() if t < 1.0 else 0)
                 for t, sel in selections.items()}
        gate_score = None if g is None else g.abs() * mlp.gate_scale.float()
        gate_taus = _quantiles(gate_score, GATE_GRID) if gate_score is not None else [0.0]
        cache[x_tau] = (h, gate_score)
        buckets = len(taus) + 2
        base = (torch.arange(n)[:, None] * groups + group) * buckets
        down_bucket = 1 + torch.bucketize(contrib, torch.tensor(taus), right=True)
        for g_tau in gate_taus:
            # per token, group and bucket: 0 = skipped by the gate, 1 + i = contribution in [taus[i-1], taus[i])
            bucket = torch.where(gate_score >= g_tau, down_bucket, 0) if g_tau > 0 else down_bucket
            flat = (base + bucket).flatten()
            count = torch.bincount(flat, minlength=n * groups * buckets).view(n * groups, buckets).double()
            sq = torch.bincount(flat, weights=contrib.flatten().double() ** 2,
                                minlength=n * groups * buckets).view(n * groups, buckets)
            kept_per_group = count[:, 1:].sum(1).view(n, groups)
            for t, (dropped_expert_err, recall, gate_cells, router) in per_t.items():
                mask = on[t].double()
                up_cells = float(((kept_per_group * mask).sum(1) * n_in).mean())
                by_bucket = mask.view(1, -1) @ count
                sq_bucket = (mask.view(1, -1) @ sq)[0].cumsum(0)
                kept = float(by_bucket[0, 1:].sum())
                by_bucket = by_bucket[0].cumsum(0)
                for i, tau in enumerate(taus):
                    # buckets < i + 2 are dropped. The dropped parts' squared norms are summed without their cross
                    # terms, hence a screen only
                    down = (kept - float(by_bucket[i + 1] - by_bucket[0])) / n
                    err = input_err + dropped_expert_err + float(sq_bucket[i + 1]) / n
                    macs = mlp_macs_sparse(d, gate_cells, up_cells, down, router)
                    screened.append(Point(macs, err, t, tau, x_tau, recall, g_tau, expert_frac[t]))
    points = [Point(mlp_macs_dense(d, mlp.intermediate, mlp.gated), 0.0, 1.0, 0.0, 0.0, 1.0)]
    for p in _pareto(screened):
        h, gate_score = cache[p.input_tau]
        keep = mlp.neuron_mask(selections[p.threshold])
        if p.gate_tau > 0:
            keep = keep & (gate_score >= p.gate_tau)
        if p.down_tau > 0:
            keep = keep & (h.abs() * norms >= p.down_tau)
        err = float((F.linear(h * keep, w_down) - y_full).pow(2).sum()) / n
        points.append(Point(p.macs, err * weight, p.threshold, p.down_tau, p.input_tau, p.recall, p.gate_tau,
                            p.experts))
    return points


def _pareto(points: list[Point], limit: int = EXACT_POINTS) -> list[Point]:
    """The points no other point beats on both MACs and error; where more than `limit`, the least-error one in each
    of `limit` equal MACs bins (the exact re-scoring is the costly part of conversion)."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p.macs, p.err)):
        if p.err < best:
            front.append(p)
            best = p.err
    if len(front) > limit:
        lo, span = front[0].macs, front[-1].macs - front[0].macs
        bins = {min(int((p.macs - lo) / span * limit), limit - 1): p for p in front}  # later = less error
        front = list(bins.values())
    return front


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
            "gate_tau": [p.gate_tau for p in chosen],
            "calib_mlp_flops_kept": sum(p.macs for p in chosen) / dense,
            "calib_expert_recall": [round(p.recall, 4) for p in chosen],
            # per layer, the mean fraction of experts selected per calibration token (runtime: expert_frac)
            "expert_frac": [round(p.experts, 4) for p in chosen],
        })
    return out


@torch.no_grad()
def set_budget_biases(mlps: list[SparseMLP], held: list[torch.Tensor], budgets: list[dict]) -> None:
    """Bias correction: per layer, `budget_bias` [len(budgets), hidden] = the mean of (dense - sparse) MLP output
    over held-out calibration inputs at each budget's dials, which apply_budget interpolates and the sparse forward
    adds back. The part of each layer's error that is the same for every token costs nothing to remove, and it
    adds up over layers and tokens."""
    for m in mlps:
        m.budget_bias = torch.nn.Parameter(torch.zeros(len(budgets), m.hidden), requires_grad=False)
    dense = [m._dense_forward(x.float()) for m, x in zip(mlps, held)]
    for i, b in enumerate(budgets):
        apply_budget(mlps, budgets, b["target"])
        for m, x, y in zip(mlps, held, dense):
            m.bias_mix = None  # the error of the uncorrected sparse forward
            m.budget_bias[i] = (y - m._torch_forward(x.float())).mean(0)
