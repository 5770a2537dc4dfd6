"""Choose per-layer thresholds that meet a global MLP-FLOPs budget at the least estimated loss.

Dials per layer: the input threshold (gate/up skip input channels with tiny |x|, TEAL-style, exact given x),
the router mass threshold t (experts, XMoE rule; t = 1 runs no router), the gate threshold (gated FFNs: up and
down skip neurons whose |act(gate)| * RMS(up) * ||down row|| is tiny, CATS-style but scaled to the neuron's expected
output, exact given the gate) and the down threshold (skip down rows whose |h| * ||down row|| is tiny inside the
chosen experts, exact given h). A fifth, early decisions: the gate and down thresholds judge each neuron on partial
sums over only the larger input channels (|x| >= decide_tau), so a neuron they drop costs only those channels and
the kept ones are completed over every channel input skip keeps (on by default with input skip: it saves FLOPs,
not bytes). Every combination on a grid is screened on held-out calibration tokens with its
MLP multiply-adds and a cheap error estimate (the exact error of the input sparsity plus the squared output norms
of the experts and neurons left out); the screened Pareto front is then re-scored with the exact output error of
its combined masks. Errors in different layers are compared by what they cost in loss: the loss probe (on by
default) runs each layer alone at its point of the PROBE_BUDGET allocation and rescales the layer's errors by the
model's KL from the dense model over that point's error; without the probe, each layer's error is weighted by its
loss sensitivity (mean squared gradient of the LM loss w.r.t. that FFN's output, a diagonal Fisher). A weight the
probe would also apply cancels in its ratio, so conversions with the probe skip the sensitivity's backward passes
(the weight only chooses which point each layer is probed at). A Lagrangian sweep then picks one combination per
layer so that the total FLOPs meet the target at the least weighted error; layers differ.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from densesparse.flops import mlp_macs_dense, mlp_macs_sparse
from densesparse.router import norms_from_hidden
from densesparse.runtime import SparseMLP, apply_budget, threshold_select

INPUT_GRID = (0.0, 0.15, 0.3, 0.45, 0.6, 0.7, 0.8)  # quantiles of |x| dropped
MASS_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
GATE_GRID = (0.0, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9)  # quantiles of |act(gate)| * gate_scale dropped
RHO_GRID = (0.0, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)  # quantiles of neuron contributions dropped in down
DECIDE_GRID = (0.5, 0.7, 0.85)  # quantiles of |x| the early decisions leave out (above the input skip's)
QUANTILE_SAMPLE = 1 << 18  # thresholds need quantiles to ~0.2%, not exact sorts of millions
EXACT_POINTS = 96
# the allocation whose per-layer points the loss probe runs: 0.5 gave lower held-out calibration KL than 0.35 at 25,
# 35 and 50% (bench/results/probe-variants-smollm2.json, rechecked in probe-variants-smollm2-default-at-half.json;
# WikiText never consulted)
PROBE_BUDGET = 0.5
PROBE_TOKENS = 1024  # calibration tokens each probe forward runs


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
    # the gate dial and down skip decide on the input channels with |x| >= decide_tau (= input_tau: all of them)
    decide_tau: float = 0.0
    # the bias correction of this point's dials [hidden] (shrunk_mean of dense - sparse output on the held-out
    # tokens), kept by the exact re-scoring that computes those outputs anyway; None: no correction (dense)
    bias: torch.Tensor | None = None


@functools.lru_cache(maxsize=4)
def _sample_index(numel: int) -> torch.Tensor:
    return torch.randint(numel, (QUANTILE_SAMPLE,), generator=torch.Generator().manual_seed(0))


def _quantiles(values: torch.Tensor, qs) -> list[float]:
    flat = values.flatten()
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[_sample_index(flat.numel())]
    ranks = {q: min(int(q * flat.numel()), flat.numel() - 1) for q in qs if q > 0}
    # the same order statistics as a full sort, by selection (numpy's introselect: ~6x faster than torch's sort)
    part = np.partition(flat.float().contiguous().numpy(), sorted(set(ranks.values()))) if ranks else None
    return [float(part[ranks[q]]) if q > 0 else 0.0 for q in qs]


@torch.no_grad()
def layer_points(mlp: SparseMLP, x: torch.Tensor, weight: float, down_skip: bool, input_skip: bool = True,
                 early: bool = True) -> list[Point]:
    """The layer's (MACs, loss-weighted output error) trade-off over the dials' grid."""
    x = x.float()
    n, d = x.shape
    w_down = mlp.canonical()[4].float().t()
    norms = mlp.down_norms()
    y_full = F.linear(mlp.hidden_states(x), w_down)
    logits = mlp.router.float()(x)
    selections = {t: threshold_select(logits, t) for t in MASS_GRID}
    masses = list(selections)
    # per token and neuron, the first mass threshold that keeps it (MASS_GRID ascends, so every later one does too)
    born = mlp.neuron_mask(torch.stack([~sel for sel in selections.values()]).sum(0, dtype=torch.int32), shared=0)
    rows = torch.stack([mlp.n_shared + sel.sum(1) * mlp.expert_size for sel in selections.values()]).double()
    router = torch.tensor([float(mlp.router.macs()) if t < 1.0 else 0.0 for t in masses], dtype=torch.float64)
    input_qs = INPUT_GRID if input_skip else (0.0,)
    x_taus = dict(zip(input_qs, _quantiles(x.abs(), input_qs)))
    # early decisions save FLOPs, not bytes: with input skip off (the GPU setting) they are off too
    decide_qs = DECIDE_GRID if early and input_skip and (mlp.gated or down_skip) else ()
    decide_taus = dict(zip(decide_qs, _quantiles(x.abs(), decide_qs)))
    partial = {}
    for q, tau in decide_taus.items():
        channels = x.abs() >= tau
        partial[q] = (*mlp.gate_and_up(x * channels), channels.sum(1).double())
    cache, by_scores, screened = {}, {}, []
    for x_q, x_tau in x_taus.items():
        keep_x = x.abs() >= x_tau
        n_in = keep_x.sum(1).double()
        g, u = mlp.gate_and_up(x * keep_x)
        h = u if g is None else g * u
        input_err = float((F.linear(h, w_down) - y_full).pow(2).sum()) / n if x_tau > 0 else 0.0
        contrib_sq = (h.abs() * norms).double().pow_(2).flatten()  # what leaving a neuron out adds to the error
        true = norms_from_hidden(mlp, h)
        total_mass = true.sum(1).clamp_min(1e-12)
        dropped_err = torch.tensor([float((true.pow(2) * ~sel).sum()) / n for sel in selections.values()],
                                   dtype=torch.float64)
        recall = [float(((true * sel).sum(1) / total_mass).mean()) for sel in selections.values()]
        # deciding on x_tau's own channels is the plain dials; each larger decide threshold is an option
        options = [(("plain", x_q), x_tau, g, u, n_in)] + [(("decide", q), decide_taus[q], *partial[q])
                                                           for q in decide_qs if q > x_q + 0.05]
        for key, dec_tau, g_dec, u_dec, n_dec in options:
            if key not in by_scores:  # a decide option's scores are those of its partial sums, whatever x_tau is
                gate_score = None if g is None else g_dec.abs() * mlp.gate_scale.float()
                down_score = (u_dec if g is None else g_dec * u_dec).abs() * norms
                by_scores[key] = _binned(gate_score, down_score, born, len(masses), down_skip)
            cache[(x_tau, dec_tau)] = (h, by_scores[key])
            screened += _screen(d, n_in, n_dec, contrib_sq, by_scores[key], rows, router, input_err + dropped_err,
                                recall, masses, x_tau, dec_tau)
    points = [Point(mlp_macs_dense(d, mlp.intermediate, mlp.gated), 0.0, 1.0, 0.0, 0.0, 1.0)]
    for p in _pareto(screened):
        h, scores = cache[(p.input_tau, p.decide_tau)]
        keep = mlp.neuron_mask(selections[p.threshold])
        if p.gate_tau > 0:
            keep = keep & (scores.gate >= p.gate_tau)
        if p.down_tau > 0:
            keep = keep & (scores.down >= p.down_tau)
        miss = y_full - F.linear(h * keep, w_down)
        points.append(Point(p.macs, float(miss.pow(2).sum()) / n * weight, p.threshold, p.down_tau, p.input_tau,
                            p.recall, p.gate_tau, float(selections[p.threshold].float().mean()), p.decide_tau,
                            shrunk_mean(miss)))
    return points


def _reached(values: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """How many of the ascending thresholds each value reaches (torch.bucketize(right=True)'s answer, counted by
    comparisons in uint8: about 2.5x faster for the few thresholds of a grid)."""
    count = torch.zeros(values.shape, dtype=torch.uint8)
    for tau in thresholds:
        count += values >= tau
    return count


@dataclass
class _Bins:
    """One pair of gate and down scores [token, neuron], binned for _screen: every mass, down and gate threshold
    cell a neuron falls in, and per token how many neurons fall in each."""
    gate: torch.Tensor | None
    down: torch.Tensor
    taus: list[float]
    gate_taus: list[float]
    bins: torch.Tensor
    counts: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.taus) + 2, len(self.gate_taus) + 1


def _binned(gate_score, down_score, born, n_masses, down_skip) -> _Bins:
    """The scores' quantile thresholds and bins. Mass thresholds are nested: `born` [token, neuron] is the index of
    the first one that keeps the neuron's expert, so sums binned by it and accumulated over the mass grid serve all
    at once."""
    n = down_score.shape[0]
    taus = _quantiles(down_score, RHO_GRID if down_skip else (0.0,))
    gate_taus = _quantiles(gate_score, GATE_GRID) if gate_score is not None else [0.0]
    buckets, levels = len(taus) + 2, len(gate_taus) + 1
    # bucket 0 = skipped by the gate, 1 + i = down score in [taus[i-1], taus[i]); a neuron's gate level is how many
    # gate thresholds its score reaches, so gate threshold j skips it iff its level <= j (the thresholds ascend)
    down_bucket = 1 + _reached(down_score, taus).int()
    level = _reached(gate_score, gate_taus) if gate_score is not None else 1
    size = n_masses * buckets * levels
    bins = (born * buckets + down_bucket) * levels + level  # int32: n * size is far below 2^31
    counts = torch.bincount((bins + (torch.arange(n, dtype=torch.int32) * size)[:, None]).flatten(),
                            minlength=n * size).view(n, size).double()
    return _Bins(gate_score, down_score, taus, gate_taus, bins, counts)


def _screen(d, n_in, n_dec, contrib_sq, binned: _Bins, rows, router, base_err, recall, masses, x_tau, dec_tau
            ) -> list[Point]:
    """Every (mass, gate, down) threshold combination at one input and decide threshold: MACs as the runtime
    counts them and a cheap error screen (exact input-skip error + squared norms of what the masks leave out, their
    cross terms ignored)."""
    n, taus, gate_taus, (buckets, levels) = n_in.shape[0], binned.taus, binned.gate_taus, binned.shape
    # per-token counts weighted by the per-token channel counts: integers, so exactly the per-neuron sums
    per_token = torch.stack([torch.ones_like(n_in), n_dec, n_in - n_dec], 1)  # rows, decision, completion channels
    squared = torch.bincount(binned.bins.flatten(), weights=contrib_sq, minlength=binned.counts.shape[1])
    joint = torch.cat([per_token.T @ binned.counts, squared[None]]).T.reshape(len(masses), buckets, levels, 4)
    from_level = joint.flip(2).cumsum(2).flip(2)  # [mass, bucket, j] = the sums over gate levels >= j
    total = joint.sum((1, 2))
    down_on = torch.tensor(taus, dtype=torch.float64) > 0
    out = []
    for j, g_tau in enumerate(gate_taus):
        by_bucket = from_level[:, :, j + 1].clone()  # what gate threshold j keeps, by down bucket
        by_bucket[:, 0] = total - by_bucket.sum(1)
        cum = by_bucket.cumsum(0).transpose(1, 2).cumsum(2) / n  # [mass, 4, bucket]
        kept = cum[:, :, -1:] - cum[:, :, :1]  # what the gate dial keeps (every bucket but 0), per token
        after = cum[:, :, -1:] - cum[:, :, 1:-1]  # what down tau i keeps (buckets > i + 1)
        if binned.gate is None:
            gate_cells = torch.zeros(len(masses), 1, dtype=torch.float64)
        else:
            # gate rows are completed for the neurons the last dial keeps (the down skip judges the partial gate)
            decided = (rows * n_dec).mean(1, keepdim=True)
            dial = decided + kept[:, 2] if g_tau > 0 else (rows * n_in).mean(1, keepdim=True)
            gate_cells = torch.where(down_on, decided + after[:, 2], dial)
        up_cells = torch.where(down_on, kept[:, 1] + after[:, 2], kept[:, 1] + kept[:, 2])
        macs = mlp_macs_sparse(d, gate_cells, up_cells, after[:, 0], router[:, None]).tolist()
        err = (base_err[:, None] + cum[:, 3, 1:-1]).tolist()
        for a, t in enumerate(masses):
            for i, tau in enumerate(taus):
                # with neither dial on, early decisions change nothing: the plain option stands for them
                if g_tau > 0 or tau > 0 or dec_tau == x_tau:
                    out.append(Point(macs[a][i], err[a][i], t, tau, x_tau, recall[a], g_tau, decide_tau=dec_tau))
    return out


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


def set_dials(mlp: SparseMLP, p: Point | None) -> None:
    """Put one layer at a trade-off point (None: dense), without bias correction."""
    mlp.threshold, mlp.down_tau, mlp.input_tau, mlp.gate_tau, mlp.decide_tau = (
        (p.threshold, p.down_tau, p.input_tau, p.gate_tau, p.decide_tau) if p else (1.0, 0.0, 0.0, 0.0, 0.0))
    mlp.bias_mix = None


def probe_windows(batches: list[torch.Tensor], tokens: int = PROBE_TOKENS) -> list[torch.Tensor]:
    """The first calibration windows that hold `tokens` tokens: what the loss probe runs."""
    wins, held = [], 0
    for ids in batches:
        if held >= tokens:
            break
        wins.append(ids)
        held += ids.numel()
    return wins


@torch.no_grad()
def probe_losses(model, mlps: list[SparseMLP], per_layer: list[list[Point]], wins: list[torch.Tensor],
                 step=None, at: float = PROBE_BUDGET, layers: list | None = None) -> list[float]:
    """Per layer, the factor its errors are to be multiplied by: the model's measured KL(dense || sparse) on wins
    when that layer alone runs its point of the allocation for budget `at`, over the point's estimated (weighted)
    error, divided by the geometric mean of those ratios (the sweep is blind to a common scale). An output error,
    even weighted by the loss sensitivity (which conversions with the probe skip: weight 1), treats every error
    direction alike, so it cannot see how much of a layer's error the later layers undo or amplify; against the
    sensitivity-weighted errors, the measured ratios differed about 3x from the first layers to the middle ones on
    SmolLM2. A layer dense at the probe budget keeps the mean factor. The layers are left dense; step() is called
    per layer. `layers`: the decoder layers, mlps[i] inside layers[i]; the layers before the probed one then replay
    their dense outputs instead of recomputing them (the same numbers, about 40% less work)."""
    for m in mlps:
        set_dials(m, None)
    replay = layers is not None and len(layers) == len(mlps) and all(
        any(mod is m for mod in layer.modules()) for layer, m in zip(layers, mlps))
    outputs = [[] for _ in wins]
    with _recorded(layers if replay else [], outputs):
        dense = [reference(model, w) for w in wins]
    ratios = []
    for i, (m, p) in enumerate(zip(mlps, allocate(per_layer, at))):
        if p.err <= 0:
            ratios.append(None)
            continue
        set_dials(m, p)
        kl = kl_per_token(model, wins, dense, [(layers[:i], o[:i]) for o in outputs] if replay else None)
        set_dials(m, None)
        ratios.append(kl / p.err)
        if step:
            step()
    measured = [r for r in ratios if r and r > 0]
    if not measured:
        return [1.0] * len(mlps)
    mean = math.exp(sum(math.log(r) for r in measured) / len(measured))
    return [r / mean if r and r > 0 else 1.0 for r in ratios]


def _copied(out):
    """A copy of a decoder layer's output (a tensor or a tuple holding tensors): later layers may add in place."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(_copied(o) for o in out) if isinstance(out, tuple) else out


@contextmanager
def forward_hooks(modules: list, hook_for):
    """hook_for(i) registered as module i's forward hook for the duration."""
    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _recorded(layers: list, outputs: list[list]):
    """Record copies of the layers' outputs: on the k-th forward of the model, outputs[k] gets them in layer order."""
    calls = [0] * len(layers)

    def hook(i):
        def record(module, args, out):
            outputs[calls[i]].append(_copied(out))
            calls[i] += 1
        return record

    return forward_hooks(layers, hook)


@contextmanager
def _replayed(layers: list, outputs: list):
    """The layers return copies of the recorded outputs instead of running (their inputs are then unused)."""
    own = [vars(layer).get("forward") for layer in layers]  # an instance-level forward (a wrapper) comes back
    for layer, out in zip(layers, outputs):
        layer.forward = lambda *args, _out=out, **kwargs: _copied(_out)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            del layer.forward
            if forward is not None:
                layer.forward = forward


KL_ROWS = 32  # tokens per step of a vocab-wide computation: its temporaries then stay in the CPU's cache


@dataclass
class Reference:
    """The dense model's next-token distribution on one window, log p and p [T, vocab], computed once. Everything
    vocab-wide runs KL_ROWS tokens at a time: on the 2-core CPU a KL over whole-window temporaries (100 MB for 512
    tokens of a 49k vocabulary) took about 3x as long, its time going to memory traffic, not arithmetic."""
    log_p: torch.Tensor
    p: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor) -> "Reference":
        log_p = torch.cat([F.log_softmax(rows.float(), dim=-1) for rows in logits.split(KL_ROWS)])
        return cls(log_p, log_p.exp())

    def kl(self, logits: torch.Tensor) -> float:
        """Sum over tokens of KL(p || softmax(logits)) for logits [T, vocab]."""
        return self._chunks(logits, None, 1.0)

    def kl_and_grad(self, logits: torch.Tensor, grad_div: float) -> tuple[float, torch.Tensor]:
        """kl(logits) and its gradient w.r.t. the logits divided by grad_div, (softmax(logits) - p) / grad_div
        [T, vocab] in float32."""
        grad = torch.empty(logits.shape, device=logits.device)
        return self._chunks(logits, grad, grad_div), grad

    def _chunks(self, logits: torch.Tensor, grad: torch.Tensor | None, grad_div: float) -> float:
        total = 0.0
        for i in range(0, logits.shape[0], KL_ROWS):
            rows = slice(i, i + KL_ROWS)
            log_q = F.log_softmax(logits[rows].float(), dim=-1)
            if grad is not None:
                torch.sub(log_q.exp(), self.p[rows], out=grad[rows]).div_(grad_div)
            total += float((self.log_p[rows] - log_q).mul_(self.p[rows]).sum())
        return total


def _window_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids[None], use_cache=False).logits[0]


@torch.no_grad()
def reference(model, ids: torch.Tensor) -> Reference:
    return Reference.of(_window_logits(model, ids))


@torch.no_grad()
def kl_per_token(model, wins: list[torch.Tensor], dense: list[Reference], prefixes: list | None = None
                 ) -> float:
    """Mean KL(dense || model) per token over wins, given the dense model's reference on each window; prefixes:
    per window, (layers, their recorded outputs) to replay instead of running them."""
    kl = 0.0
    for j, (w, ref) in enumerate(zip(wins, dense)):
        with _replayed(*(prefixes[j] if prefixes else ([], []))):
            kl += ref.kl(_window_logits(model, w))
    return kl / sum(w.numel() for w in wins)


def reweight(per_layer: list[list[Point]], factors: list[float]) -> list[list[Point]]:
    return [[replace(p, err=p.err * f) for p in pts] for pts, f in zip(per_layer, factors)]


def same_budget(a: float, b: float) -> bool:
    """Budgets come from the grid's arithmetic, the spec and the command line: equal within rounding."""
    return abs(a - b) < 1e-6


def budget_grid(min_budget: float) -> list[float]:
    grid, t = [], 0.95
    while t >= min_budget - 1e-9:
        grid.append(round(t, 4))
        t -= 0.05
    if not grid or grid[-1] > min_budget:
        grid.append(min_budget)
    return sorted(grid)


def calibrate_budgets(per_layer: list[list[Point]], min_budget: float, targets: list[float] | None = None
                      ) -> list[dict]:
    """Per-layer settings at each budget of the grid down to min_budget (or at `targets`)."""
    dense = sum(p[0].macs for p in per_layer)
    out = []
    for target in targets or budget_grid(min_budget):
        chosen = allocate(per_layer, target)
        out.append({
            "target": target,
            "thresholds": [p.threshold for p in chosen],
            "down_tau": [p.down_tau for p in chosen],
            "input_tau": [p.input_tau for p in chosen],
            "gate_tau": [p.gate_tau for p in chosen],
            "decide_tau": [p.decide_tau for p in chosen],
            "calib_mlp_flops_kept": sum(p.macs for p in chosen) / dense,
            "calib_expert_recall": [round(p.recall, 4) for p in chosen],
            # per layer, the mean fraction of experts selected per calibration token (runtime: expert_frac)
            "expert_frac": [round(p.experts, 4) for p in chosen],
        })
    return out


def set_budget_biases(mlps: list[SparseMLP], per_layer: list[list[Point]], budgets: list[dict]) -> None:
    """Bias correction: per layer, `budget_bias` [len(budgets), hidden] = the mean of (dense - sparse) MLP output
    over held-out calibration inputs at each budget's dials, which apply_budget interpolates and the sparse forward
    adds back. The part of each layer's error that is the same for every token costs nothing to remove, and it
    adds up over layers and tokens. Each mean is shrunk toward zero by the positive-part James-Stein factor
    1 - (tr cov / n) / ||mean||^2: where the error's mean is small against its sampling noise (light budgets), a raw
    mean from n held-out tokens adds more noise than it removes. The means come with the points (layer_points
    measured them on the same held-out tokens, at the same dials): each budget's allocation picks them."""
    for m in mlps:
        m.budget_bias = torch.nn.Parameter(torch.zeros(len(budgets), m.hidden), requires_grad=False)
    for i, b in enumerate(budgets):
        for m, p in zip(mlps, allocate(per_layer, b["target"])):
            if p.bias is not None:
                m.budget_bias[i] = p.bias


def shrunk_mean(err: torch.Tensor) -> torch.Tensor:
    """The mean of err [n, d] over its rows, times the positive-part James-Stein factor."""
    mean = err.mean(0)
    noise = err.var(0).sum() / err.shape[0]  # expected ||sampling error of the mean||^2
    return mean * (1 - noise / mean.square().sum().clamp_min(1e-30)).clamp_min(0)
