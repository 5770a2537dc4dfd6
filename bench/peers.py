"""Compact re-implementations, written here, of published training-free MLP sparsity methods and of two bounds.

They are our readings of the papers, for side-by-side measurement on the same model, text and FLOPs count; they are
not the authors' code. Every method computes the MLP output of its kept work only and counts its multiply-adds
per token from the real masks:
- TEAL (Liu et al. 2024): magnitude thresholds on the MLP input (gate/up) and the intermediate activation (down).
- WINA (2025): as TEAL, scoring |input| times the norm of the weight column it multiplies.
- CATS (Lee et al. 2024): threshold on |act(gate)|; gate dense, up and down skip.
- CMoE (2025): shared experts from most active neurons, co-activation clusters, router from representative neurons.
- oracle-neuron: per token the largest |h| neurons (a bound). oracle-expert: per token the experts with the largest
  true output norm for our grouping (a bound). oracle-router: our conversion, every dial and threshold as
  calibrated, but the router's scores replaced by the log of the true expert output norms, the distribution the
  router is trained to match (a bound: what a perfect router would give, so the rest of the loss is not routing).
  oracle-up: our conversion with the gate dial scored by the true |act(gate) * up| * ||down row|| instead of
  |act(gate)| * gate_scale (RMS(up), or E|up| before, times ||down row||: nearly the same scale, so the
  calibrated thresholds apply): a bound on predicting up.
  oracle-router-up: both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from densesparse.budget import Point, allocate
from densesparse.router import expert_output_norms
from densesparse.runtime import SparseMLP, threshold_select

EPS = 1e-12


class PeerMLP(SparseMLP):
    """A SparseMLP whose forward is one of the peer methods; counts multiply-adds per token."""

    method: str = "dense"
    params: dict = {}

    def reset_count(self):
        self.macs_sum, self.tokens = 0.0, 0

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y, macs = METHODS[self.method](self, x2, **self.params)
        self.macs_sum += float(macs.sum())
        self.tokens += x2.shape[0]
        return y.reshape(*shape[:-1], y.shape[-1])

    def gu(self) -> int:
        return 2 if self.gated else 1

    def dense_macs(self) -> float:
        return float(self.hidden * self.intermediate * (self.gu() + 1))


def input_col_norms(mlp) -> torch.Tensor:
    w_gate, w_up = mlp.canonical()[:2]
    sq = w_up.float().pow(2).sum(0)
    if w_gate is not None:
        sq = sq + w_gate.float().pow(2).sum(0)
    return sq.sqrt()


def run_dense(mlp, x):
    return mlp.down(mlp.hidden_states(x)), torch.full((x.shape[0],), mlp.dense_macs())


def run_teal(mlp, x, tau_x, tau_h, col=None, down=None):
    """TEAL (col/down None) or WINA (col = input column norms, down = down column norms)."""
    sx = x.abs() * col if col is not None else x.abs()
    keep_x = sx >= tau_x
    h = mlp.hidden_states(x * keep_x)
    sh = h.abs() * down if down is not None else h.abs()
    keep_h = sh >= tau_h
    macs = keep_x.sum(1) * mlp.intermediate * mlp.gu() + keep_h.sum(1) * mlp.hidden
    return mlp.down(h * keep_h), macs.float()


def run_cats(mlp, x, tau):
    w_gate, w_up, b_gate, b_up = mlp.canonical()[:4]
    g = mlp.act(F.linear(x, w_gate, b_gate))
    keep = g.abs() >= tau
    h = g * F.linear(x, w_up, b_up) * keep
    macs = mlp.hidden * mlp.intermediate + 2 * mlp.hidden * keep.sum(1)
    return mlp.down(h), macs.float()


def run_oracle_neuron(mlp, x, frac):
    h = mlp.hidden_states(x)
    k = max(1, round(frac * mlp.intermediate))
    idx = h.abs().topk(k, dim=1).indices
    keep = torch.zeros_like(h, dtype=torch.bool).scatter(1, idx, True)
    return mlp.down(h * keep), torch.full((x.shape[0],), float(k * mlp.hidden * (mlp.gu() + 1)))


def _expert_topk(mlp, scores, k):
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)


def _run_experts(mlp, x, sel, router_macs):
    """The MLP on the shared neurons plus the selected experts, and its multiply-adds per token."""
    h = mlp.hidden_states(x) * mlp.neuron_mask(sel)
    macs = router_macs + (mlp.n_shared + sel.sum(1) * mlp.expert_size) * mlp.hidden * (mlp.gu() + 1)
    return mlp.down(h), macs.float()


def run_oracle_expert(mlp, x, frac):
    k = max(1, round(frac * mlp.intermediate / mlp.expert_size) - mlp.n_shared // mlp.expert_size)
    sel = _expert_topk(mlp, expert_output_norms(mlp, x), min(k, mlp.n_experts))
    return _run_experts(mlp, x, sel, 0)


def run_cmoe(mlp, x, k, reps):
    """Router = activations of each expert's representative neuron (computed exactly, counted as router cost)."""
    w_gate, w_up, b_gate, b_up = mlp.canonical()[:4]
    u = F.linear(x, w_up[reps], None if b_up is None else b_up[reps])
    hr = mlp.act(F.linear(x, w_gate[reps], None if b_gate is None else b_gate[reps])) * u if mlp.gated else mlp.act(u)
    sel = _expert_topk(mlp, hr.abs() * mlp.down_norms()[reps], k)
    return _run_experts(mlp, x, sel, len(reps) * mlp.hidden * mlp.gu())


def oracle_router(mlp: SparseMLP) -> None:
    """Make mlp (a SparseMLP of ours, CPU path) select experts by true output norms through its own XMoE
    threshold; everything else (dials, thresholds, FLOPs count) is unchanged, router multiply-adds still counted."""
    def select(x2):
        if mlp.threshold >= 1.0:
            return SparseMLP.select(mlp, x2)
        norms = expert_output_norms(mlp, x2)
        return threshold_select(torch.log(norms + EPS), mlp.threshold)
    mlp.select = select


def oracle_up(mlp: SparseMLP) -> None:
    """Make mlp's gate dial (CPU path) keep neurons by their true |h| * ||down row||, and both it and down skip
    judge the full sums where the budget decides early; FLOPs counted as before."""
    norms = mlp.down_norms()
    mlp.gate_score = lambda g, u: (g * u).abs() * norms.to(g.dtype)
    mlp.decision_sums = lambda x2, g, u: (g, u)


def free_partial_up(mlp: SparseMLP) -> None:
    """Where mlp decides early, make its gate dial (CPU path) score each neuron by |act(partial gate) * partial up| *
    ||down row|| instead of |act(partial gate)| * gate_scale. The partial up of the routed rows the dial
    drops, which this score needs, is not counted: an optimistic bound on a dial that would pay for it."""
    norms = mlp.down_norms()
    plain = mlp.decision_sums

    def decision_sums(x2, g, u):
        g_dec, u_dec = plain(x2, g, u)
        mlp.partial_up = u_dec if mlp.deciding else None
        return g_dec, u_dec

    def gate_score(g, u):
        if mlp.partial_up is None:
            return SparseMLP.gate_score(mlp, g, u)
        return (g * mlp.partial_up).abs() * norms.to(g.dtype)
    mlp.decision_sums, mlp.gate_score = decision_sums, gate_score


def counted_partial_up(mlp: SparseMLP) -> None:
    """free_partial_up with what it does not count added to the stats: the partial up (decision channels) of every
    routed row the gate dial drops. Thresholds stay as calibrated for our score, so the row lands at its own FLOPs."""
    free_partial_up(mlp)
    plain = mlp._record

    def record(x2, expert_mask, n_down, up_rows=None):
        plain(x2, expert_mask, n_down, up_rows)
        if mlp.partial_up is not None and up_rows is not None:
            rows = mlp.n_shared + expert_mask.sum(1) * mlp.expert_size
            mlp.stats.up_cells += int(((x2.abs() >= mlp.decide_tau).sum(1) * (rows - up_rows)).sum())
    mlp._record = record


# bounds on our own conversion: the patches each applies to every layer, and its row's setting
OURS_BOUNDS = {"oracle-router": ((oracle_router,), "router = true norms"),
               "oracle-up": ((oracle_up,), "gate dial on true |h|"),
               "oracle-router-up": ((oracle_router, oracle_up), "both"),
               "free-partial-up": ((free_partial_up,), "gate dial on partial h, partial up not counted"),
               "counted-partial-up": ((counted_partial_up,), "gate dial on partial h, partial up counted")}


METHODS = {"dense": run_dense, "teal": run_teal, "wina": run_teal, "cats": run_cats,
           "oracle-neuron": run_oracle_neuron, "oracle-expert": run_oracle_expert, "cmoe": run_cmoe}


# -- calibration of each method's thresholds from the same calibration sample -------------------------------------
def quantile(values: torch.Tensor, q: float, sample: int = 1 << 22) -> float:
    flat = values.flatten()
    if flat.numel() > sample:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:sample]]
    return float(torch.quantile(flat.float(), q)) if q > 0 else 0.0


@torch.no_grad()
def teal_uniform(mlp, x, target, wina=False):
    """Same sparsity level for the MLP input and the intermediate activation in every layer: kept ~ target."""
    s = 1.0 - target
    col = input_col_norms(mlp) if wina else None
    down = mlp.down_norms() if wina else None
    sx = x.abs() * col if wina else x.abs()
    tau_x = quantile(sx, s)
    h = mlp.hidden_states(x * (sx >= tau_x))
    sh = h.abs() * down if wina else h.abs()
    return {"tau_x": tau_x, "tau_h": quantile(sh, s), "col": col, "down": down}


GREEDY_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def teal_layer_points(mlp, x, weight):
    """TEAL's per-layer allocation: exact output error and MACs for each (input, activation) sparsity pair."""
    y = mlp.down(mlp.hidden_states(x))
    pts = []
    for sx in GREEDY_LEVELS:
        tau_x = quantile(x.abs(), sx)
        keep_x = x.abs() >= tau_x
        h = mlp.hidden_states(x * keep_x)
        for sh in GREEDY_LEVELS:
            tau_h = quantile(h.abs(), sh)
            keep_h = h.abs() >= tau_h
            err = float((mlp.down(h * keep_h) - y).pow(2).sum(1).mean()) * weight
            macs = float((keep_x.sum(1) * mlp.intermediate * mlp.gu() + keep_h.sum(1) * mlp.hidden).float().mean())
            pts.append(Point(macs, err, 1.0, tau_h, tau_x, 1.0))
    return pts


def teal_greedy(per_layer_points, target):
    return [{"tau_x": p.input_tau, "tau_h": p.down_tau} for p in allocate(per_layer_points, target)]


@torch.no_grad()
def cats_threshold(mlp, x, target):
    # gate dense (1 of gu+1 matrices), up and down on the kept fraction k: (1 + 2k) / 3 = target
    k = max(0.0, (target * 3 - 1) / 2)
    w_gate, _, b_gate, _ = mlp.canonical()[:4]
    g = mlp.act(F.linear(x, w_gate, b_gate))
    return {"tau": quantile(g.abs(), 1.0 - k)}


def cmoe_k(mlp, target) -> int:
    router = mlp.n_experts * mlp.hidden * mlp.gu()
    per_expert = mlp.expert_size * mlp.hidden * (mlp.gu() + 1)
    shared = mlp.n_shared * mlp.hidden * (mlp.gu() + 1)
    return int(max(1, min(mlp.n_experts, round((target * mlp.dense_macs() - router - shared) / per_expert))))


@torch.no_grad()
def cmoe_representatives(mlp, x):
    """Per expert, the neuron with the largest mean contribution stands for it."""
    contrib = (mlp.hidden_states(x).abs() * mlp.down_norms()).mean(0)
    s, e = mlp.n_shared, mlp.expert_size
    block = contrib[s:].reshape(mlp.n_experts, e)
    return s + torch.arange(mlp.n_experts) * e + block.argmax(1)
