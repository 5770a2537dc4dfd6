"""The sparse FFN: neuron-group experts chosen by a threshold router, plus two exact skips: gate/up ignore input
channels with tiny |x| and the down projection ignores neurons with tiny |h| * ||down row||.

This file imports only torch and transformers: `io.py` copies it verbatim into each sparse model directory as
the `trust_remote_code` modeling file, so plain transformers can load a sparse model without densesparse.
On CUDA the forward uses densesparse's Triton kernels when densesparse is installed; the pure-torch path
below is the CPU implementation and the reference they are tested against.
"""
from __future__ import annotations

import bisect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class Router(nn.Module):
    """Scores experts from the FFN input; trained so that softmax(scores) matches each token's distribution of
    true expert output norms, so router mass is a predicted share of the FFN output."""

    def __init__(self, hidden: int, width: int, n_experts: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, width)
        self.w2 = nn.Linear(width, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(x)))

    def macs(self) -> int:
        return self.w1.in_features * self.w1.out_features + self.w2.in_features * self.w2.out_features


GATE_POWER = {"rms": 2, "mean_abs": 1}


def up_power_sum(up: torch.Tensor, statistic: str) -> torch.Tensor:
    """Per neuron, the sum over tokens of |up|^p (p = 2 for the rms gate scale, 1 for mean_abs)."""
    return up.float().abs().pow(GATE_POWER[statistic]).sum(0)


def threshold_select(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """XMoE rule: per token, the fewest experts whose softmax mass reaches `threshold` (at least one)."""
    if threshold >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    p = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = p.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    return torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, mass_before < threshold)


def decides_early(decide_tau: float, input_tau: float, gate_tau: float, down_tau: float) -> bool:
    """A layer's dials decide on partial sums: its decision channels are fewer than input skip's, and a dial uses
    them."""
    return decide_tau > input_tau and (gate_tau > 0 or down_tau > 0)


class HeldWeights(nn.Module):
    """Keeps an inline FFN's second projection under its native name while SparseMLP computes the FFN."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.weight = module.weight
        self.bias = module.bias

    def forward(self, x):
        return x


class LayerStats:
    """Per-layer counters of what the sparse forward actually did, summed over tokens (FLOPs, experts per token)."""

    def __init__(self, n_experts: int):
        self.tokens = 0
        self.routed_tokens = 0  # tokens for which the router ran (it is skipped when every expert is on)
        self.experts = 0
        self.gate_cells = 0  # sum over tokens of (input channels used) x (gate rows computed)
        self.up_cells = 0  # the same for up (fewer rows than gate where the gate dial skips neurons)
        self.up_rows = 0  # up rows computed (the gate dial's kept neurons), whatever channels they were summed over
        self.input_channels = 0  # input channels gate and up are summed over (those input skip keeps)
        self.decide_channels = 0  # the channels the dials decide on (all of input_channels unless deciding early)
        self.down_neurons = 0
        self.hist = torch.zeros(n_experts + 1, dtype=torch.long)

    def update(self, n_sel: torch.Tensor, gate_cells: torch.Tensor, up_cells: torch.Tensor, n_down: torch.Tensor,
               routed: bool, up_rows: torch.Tensor | None = None, channels: torch.Tensor | None = None,
               decide_channels: torch.Tensor | None = None):
        """Per-token counts of one call: experts selected, gate and up cells, down rows, up rows and input and
        decision channels (None: not counted, as by the modeling file of a model saved before the counter)."""
        self.tokens += n_sel.numel()
        self.routed_tokens += n_sel.numel() if routed else 0
        self.experts += int(n_sel.sum())
        self.gate_cells += int(gate_cells.long().sum())
        self.up_cells += int(up_cells.long().sum())
        self.up_rows += 0 if up_rows is None else int(up_rows.long().sum())
        self.input_channels += 0 if channels is None else int(channels.long().sum())
        self.decide_channels += 0 if decide_channels is None else int(decide_channels.long().sum())
        self.down_neurons += int(n_down.sum())
        self.hist += torch.bincount(n_sel.cpu(), minlength=self.hist.numel())


# CUDA only: a call with more tokens than this runs the plain dense MLP (cuBLAS; no router, no masks), counted as
# dense in the stats: from there on the union of the tokens' experts is nearly every expert and the router costs
# more than the skipping saves. Measured: bench/results/gpu-h100.json "crossover" (H100, llama3-8b layer, expert
# size 8): at kept 0.5 sparse is 1.12-1.15x dense at T=2, 0.98-1.01x at T=3 (a tie goes to dense), 0.93x at T=4;
# see bench/GPU_NOTES.md. A very large value turns the dispatch off.
DENSE_ABOVE_TOKENS = 2

# CUDA only: a one-token call (batch-1 decode) takes the compacted Triton kernels (kernels.sparse_mlp(compact=True):
# the active expert blocks listed on the device, full tiles, the down kernel over the active rows only) when the
# layer's calibrated mean fraction of selected experts (`expert_frac`, set by apply_budget) is at most this; other
# calls take the old tiles (or whatever kernels.CONFIG["compact"] says). The host cannot read the mask without a
# sync, so the choice comes from calibration. Measured: bench/results/gpu-h100-compact.json "compact_crossover"
# (H100, llama3-8b layer, T=1, router + MLP, interleaved CUDA graphs, 3 rounds; bench/GPU_NOTES.md, compact-rule
# round): expert size 8, compacted vs old at 0.30 / 0.35 / 0.375 / 0.40 / 0.425 / 0.45 of the experts: +14.6 /
# +7.7 / +5.3 / +1.7 / +0.2 / -3.3 %, so 0.375 is the largest fraction where it wins by >= 2% (the run-to-run
# spread). With the gate dial it wins further (+4% at 0.425). Expert size 32 crosses earlier (+2.8% at 0.325,
# +0.9% at 0.35, -0.8% at 0.375): up to ~1% lost there between 0.35 and 0.375.
COMPACT_BELOW = 0.375
# CUDA only: a layer whose dense MLP weights (bytes at the activations' dtype) are fewer than the bound for its
# `expert_frac` runs the dense MLP at every token count: the sparse path's fixed cost (router launches, the gaps
# between kernels) exceeds what skipping saves (SmolLM2-135M's layer: 17.7 us or more even at 25% of the experts,
# the router alone 4.7-5.7 us, against 16.4 us for the whole dense MLP). Measured at batch 1, bf16, on an H100
# (bench/results/gpu-h100-size-crossover.json, expert size 8, six MLP shapes, 15 to 151 MB between SmolLM2-135M's
# 5.3 and Llama-2-7B's 271; bench/results/gpu-h100-sweep.json, expert sizes 8-128): at 25-75% of the experts the
# kernels lost at 26 MB and below (Qwen2.5-0.5B 0.74-0.86x, SmolLM2-135M 0.60-0.93x) and won at 101 MB and above
# (Llama-3.2-1B 1.14-1.25x at 25-50%, but 1.02x at 75%: a tie, so 75% waits for Llama-3.2-3B's 151 MB, 1.10x).
# The bounds are those smallest winning sizes; between 26 and 101 MB nothing is measured, so such layers stay
# dense. Linear between the two bounds, the first one below 50%, dense above 75%.
SPARSE_MIN_MB = ((0.5, 100.0), (0.75, 150.0))


def sparse_pays_on_gpu(weight_bytes: float, expert_frac: float) -> bool:
    """SPARSE_MIN_MB's rule: do the sparse kernels beat the dense MLP for this layer size and expert fraction?"""
    if expert_frac > SPARSE_MIN_MB[-1][0]:
        return False
    bound = SPARSE_MIN_MB[0][1]
    for (f0, b0), (f1, b1) in zip(SPARSE_MIN_MB, SPARSE_MIN_MB[1:]):
        if expert_frac > f0:
            bound = b0 + (b1 - b0) * (min(expert_frac, f1) - f0) / (f1 - f0)
    return weight_bytes >= bound * 1e6


# The attributes that decide what a SparseMLP computes at a budget (bias correction aside); expert_frac only picks
# CUDA kernels
DIALS = ("threshold", "input_tau", "gate_tau", "down_tau", "decide_tau")


class SparseMLP(nn.Module):
    """An FFN sliced into `n_experts` contiguous blocks of `expert_size` neurons after `n_shared` always-on ones.

    Parameters keep the dense model's native names (gate_proj/up_proj/down_proj, c_fc/c_proj, fc1/fc2, ...), so
    the saved weights are the dense model's, permuted, plus `router.*`.
    """

    is_densesparse_mlp = True  # duck-typed marker: the remote-code copy of this class is a different class object
    dense_above_tokens = DENSE_ABOVE_TOKENS  # CUDA path: more tokens than this in a call -> dense MLP
    size_rule = True  # CUDA path: a layer too small for the kernels to pay runs dense (SPARSE_MIN_MB)

    def __init__(self, layout: dict, act: str, parts: dict, n_shared: int, expert_size: int, n_experts: int,
                 router_width: int, hidden: int):
        super().__init__()
        self.layout = layout
        self.act_name = act
        self.act = ACT2FN[act]
        self.gated = bool(layout["gate"] or layout["fused_gate_up"])
        self.n_shared = n_shared
        self.expert_size = expert_size
        self.n_experts = n_experts
        self.hidden = hidden
        self.inline = not layout["container"]
        if self.inline:
            up = parts[layout["up"]]
            self.weight = up.weight
            self.bias = up.bias
            self._down = (parts[layout["down"]],)  # a tuple so the module stays registered only in its layer
        else:
            for name, module in parts.items():
                self.add_module(name, module)
        self.router = Router(hidden, router_width, n_experts)
        self.threshold = 1.0  # router mass threshold (1 = every expert, router not run)
        self.down_tau = 0.0  # skip down rows whose |h| * ||down row|| is below this (exact, after gate/up)
        self.input_tau = 0.0  # gate/up skip input channels with |x| below this (TEAL-style, exact given x)
        # gated FFNs: up and down skip neurons whose |act(gate)| * gate_scale is below gate_tau (exact given the
        # gate); gate_scale = RMS(up) (or E|up|) * ||down row|| from calibration turns the gate into the neuron's
        # expected share
        self.gate_tau = 0.0
        # early decisions (decide_tau > input_tau): the gate dial and the down skip decide on partial sums over the
        # input channels with |x| >= decide_tau, then only the neurons they keep get their gate (and up) completed
        # over every channel input skip keeps; a dropped neuron costs only the decision channels
        self.decide_tau = 0.0
        # mean fraction of the experts the router selects per token at the current budget (calibration's measure,
        # 1 = router off); CUDA only: it picks the kernels of one-token calls (COMPACT_BELOW), no effect on outputs
        self.expert_frac = 1.0
        if self.gated:
            self.gate_scale = nn.Parameter(torch.ones(self.intermediate), requires_grad=False)
        # bias correction (spec "bias_correction"; install() adds `budget_bias` [n budgets, hidden], the mean output
        # error per calibrated budget): apply_budget sets which rows to interpolate (row a, row b or None for the
        # dense end, weight), the sparse paths add the result (bias_now); computed from the parameter at use, so it
        # follows weights loaded or moved after apply_budget
        self.bias_mix: tuple | None = None
        self.stats: LayerStats | None = None
        # the CUDA kernels' weights ((packed weights, down-row norms); built on the first CUDA call) and the memos
        # of per-budget constants (_memo)
        self._kernel_cache: tuple | None = None
        self._memos: dict = {}

    # -- canonical views: every projection as [m, d], one row per neuron ------------------------------------------
    def _up_module(self):
        return self if self.inline else getattr(self, self.layout["up"])

    def _down_module(self):
        return self._down[0] if self.inline else getattr(self, self.layout["down"])

    def _rows(self, module, out_is_rows: bool):
        w = module.weight
        conv = self.layout["conv1d"]
        return (w.t() if conv else w) if out_is_rows else (w if conv else w.t())

    def canonical(self):
        """(w_gate, w_up, b_gate, b_up, w_down_t, b_down), each weight [m, d]."""
        upm = self._up_module()
        w_in = self._rows(upm, True)
        b_in = upm.bias
        if self.layout["fused_gate_up"]:
            m = w_in.shape[0] // 2
            w_gate, w_up = w_in[:m], w_in[m:]
            b_gate, b_up = (None, None) if b_in is None else (b_in[:m], b_in[m:])
        elif self.layout["gate"]:
            gm = getattr(self, self.layout["gate"])
            w_gate, b_gate = self._rows(gm, True), gm.bias
            w_up, b_up = w_in, b_in
        else:
            w_gate = b_gate = None
            w_up, b_up = w_in, b_in
        dm = self._down_module()
        return w_gate, w_up, b_gate, b_up, self._rows(dm, False), dm.bias

    @property
    def intermediate(self) -> int:
        return self.n_shared + self.n_experts * self.expert_size

    def dials(self) -> tuple:
        """The current values of DIALS: with the weights unchanged, equal dials compute the same function."""
        return tuple(getattr(self, name) for name in DIALS)

    @property
    def dense(self) -> bool:
        return self.threshold >= 1.0 and self.down_tau <= 0.0 and self.input_tau <= 0.0 and self.gate_tau <= 0.0

    @property
    def deciding(self) -> bool:
        """Whether a dial decides on partial sums (decide_tau) this budget."""
        return decides_early(self.decide_tau, self.input_tau, self.gate_tau, self.down_tau)

    def bias_now(self, like: torch.Tensor) -> torch.Tensor | None:
        """The current budget's bias correction on like's device and dtype (None: no correction)."""
        rows = getattr(self, "budget_bias", None)
        if self.bias_mix is None or rows is None:
            return None
        return self._memo("bias", lambda: self._bias_key(like), lambda: self._mixed_bias(rows, like))

    def _bias_key(self, like: torch.Tensor) -> tuple:
        rows = self.budget_bias
        return (self.bias_mix, rows.data_ptr(), rows._version, like.device, like.dtype)

    def _memo(self, name, key, build):
        """build(), computed once per key() and kept under name: the per-budget constants of a call (bias, down-tau
        vector, all-on mask), each a launch or two per call otherwise. Under torch.compile they are computed inside
        the graph instead (a few fused elementwise ops): a memo filled by a compiled call would hold that graph's
        own outputs, which CUDA-graph trees ("reduce-overhead", HF generate's static-cache compile) overwrite on the
        next replay."""
        if torch.compiler.is_compiling():
            return build()
        hit = self._memos.get(name)
        k = key()
        if hit is None or hit[0] != k:
            hit = self._memos[name] = (k, build())
        return hit[1]

    def _mixed_bias(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a, b, w = self.bias_mix
        ra = rows[a].detach()
        rb = rows[b].detach() if b is not None else torch.zeros_like(ra)
        return (ra + w * (rb - ra)).to(like.device, like.dtype)

    def down_norms(self) -> torch.Tensor:
        w_down_t = self.canonical()[4]
        return w_down_t.float().norm(dim=1)

    def neuron_mask(self, expert_mask: torch.Tensor, shared: int = 1) -> torch.Tensor:
        """Per token, each expert's entry [T, n_experts] spread over its neurons [T, m]; shared neurons get `shared`."""
        fill = expert_mask.new_full((expert_mask.shape[0], self.n_shared), shared)
        return torch.cat([fill, expert_mask.repeat_interleave(self.expert_size, dim=1)], dim=1)

    def up_projection(self, x2: torch.Tensor) -> torch.Tensor:
        """The up projection of x2 [T, d] for all m neurons (before any activation)."""
        _, w_up, _, b_up, _, _ = self.canonical()
        return F.linear(x2, w_up, b_up)

    def gate_and_up(self, x2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(act(gate), up) for gated FFNs, (None, act(up)) otherwise; all m neurons, dense."""
        w_gate, _, b_gate, _, _, _ = self.canonical()
        u = self.up_projection(x2)
        return (self.act(F.linear(x2, w_gate, b_gate)), u) if self.gated else (None, self.act(u))

    def hidden_states(self, x2: torch.Tensor) -> torch.Tensor:
        """All m intermediate activations h (dense; the reference the sparse paths must match on kept neurons)."""
        g, u = self.gate_and_up(x2)
        return u if g is None else g * u

    @torch.no_grad()
    def calibrate_gate_scale(self, x: torch.Tensor, statistic: str = "rms", chunk: int = 8192) -> None:
        """gate_scale = sqrt(mean up^2) ("rms": ranks neurons by their expected squared output, the error the budget
        search minimises) or mean |up| ("mean_abs") over calibration inputs x, times each neuron's down-row norm."""
        if self.gated:
            self.set_gate_scale(sum(up_power_sum(self.up_projection(xb.to(self.gate_scale.dtype)), statistic)
                                    for xb in x.split(chunk)), x.shape[0], statistic)

    @torch.no_grad()
    def set_gate_scale(self, total: torch.Tensor, n: int, statistic: str) -> None:
        """gate_scale from up_power_sum summed over n calibration tokens."""
        self.gate_scale.copy_((total / n).pow(1 / GATE_POWER[statistic]) * self.down_norms())

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """The down projection of intermediate activations h [T, m] (bias included)."""
        w_down_t, b_down = self.canonical()[4:]
        return F.linear(h, w_down_t.t(), b_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        cuda = x2.is_cuda and _kernels() is not None
        if cuda and self._kernel_cache is None and not self.n_shared % self.expert_size:
            # the first CUDA call, dense or sparse, lays the weights out for the kernels: a CUDA graph captured on
            # the old layout (a dense-budget step, say) would read freed memory after a later relayout
            self._build_kernel_cache(_kernels())
        if self.dense and self.stats is None:
            y = self._dense_forward(x2)
        elif cuda and not (x2.requires_grad and torch.is_grad_enabled()):
            # the kernels have no backward: a call that needs a gradient (the bias refinement on CUDA) runs the
            # torch path, the same sparse function (and never the dense MLP that many-token calls take here)
            y = self._cuda_forward(x2)
        else:
            y = self._torch_forward(x2)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _dense_forward(self, x2):
        return self.down(self.hidden_states(x2))

    def select(self, x2: torch.Tensor) -> torch.Tensor:
        """Expert mask [T, n_experts] from the router and the XMoE threshold rule."""
        if self.threshold >= 1.0:
            return torch.ones(x2.shape[0], self.n_experts, dtype=torch.bool, device=x2.device)
        return threshold_select(self.router(x2), self.threshold)

    def sparse_input(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 * (x2.abs() >= self.input_tau) if self.input_tau > 0 else x2

    def gate_score(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The gate dial's per-neuron score, known once the gate is computed: |act(gate)| * gate_scale (RMS(up) *
        ||down row||). u is not used: this path computes up for every neuron, the kernels only for kept ones; the
        bench's oracle-up bound scores with it."""
        return g.abs() * self.gate_scale.to(g.dtype)

    def decision_sums(self, x2: torch.Tensor, g: torch.Tensor | None, u: torch.Tensor) -> tuple:
        """(gate, up) as the gate dial and down skip judge them (torch path): summed over the decision channels
        only where this budget decides early, else g and u themselves; the bench's oracle-up bound overrides it."""
        return self.gate_and_up(x2 * (x2.abs() >= self.decide_tau)) if self.deciding else (g, u)

    def _record(self, x2, expert_mask, n_down, up_rows=None):
        """Count what this call did: per token, `n_down` neurons kept for down and `up_rows` up rows computed
        (default: the chosen experts' rows), each gate and up row over the input channels input skip keeps; with
        early decisions, a row a dial drops costs only the decision channels."""
        n_sel = expert_mask.sum(1)
        rows = self.n_shared + n_sel * self.expert_size
        up_rows = rows if up_rows is None else up_rows
        n_in = (x2.abs() >= self.input_tau).sum(1) if self.input_tau > 0 else torch.full_like(n_sel, x2.shape[1])
        gate, up = rows * n_in, up_rows * n_in
        n_dec = (x2.abs() >= self.decide_tau).sum(1) if self.deciding else n_in
        if self.deciding:
            # a gate row is completed only for the neurons the last dial keeps: the down skip judges the partial
            # gate too
            gate = rows * n_dec + (n_down if self.down_tau > 0 else up_rows) * (n_in - n_dec)
            if self.down_tau > 0:
                up = up_rows * n_dec + n_down * (n_in - n_dec)
        self.stats.update(n_sel, gate, up, n_down, self.threshold < 1.0, up_rows, n_in, n_dec)

    def _torch_forward(self, x2):
        g, u = self.gate_and_up(self.sparse_input(x2))
        # early decisions: the dials see the partial sums over the larger channels, the kept neurons the full ones
        g_dec, u_dec = self.decision_sums(x2, g, u)
        expert_mask = self.select(x2)
        keep = self.neuron_mask(expert_mask)
        up_rows = None
        if self.gate_tau > 0:
            keep = keep & (self.gate_score(g_dec, u) >= self.gate_tau)
            up_rows = keep.sum(1)
        h = u if g is None else g * u
        if self.down_tau > 0:
            h_dec = u_dec if g is None else g_dec * u_dec
            keep = keep & (h_dec.abs() * self.down_norms().to(h.dtype) >= self.down_tau)
        if self.stats is not None:
            self._record(x2, expert_mask, keep.sum(1), up_rows)
        y = self.down(h * keep)
        bias = self.bias_now(y)
        return y if bias is None else y + bias

    @torch.compiler.disable
    def _build_kernel_cache(self, k) -> None:
        """One copy of every weight: the kernels read each projection as [m, d] rows. Where that row view is not
        contiguous (nn.Linear down_proj stores [d, m]; GPT-2 Conv1D c_fc stores [d, m]), re-lay the parameter's
        storage in place as a contiguous [m, d] tensor and keep the parameter as its transposed view (F.linear
        and Conv1D take it as is); the old storage is freed, nothing is duplicated. Keeps (packed weights, down-row
        norms). Runs eagerly on the module's first CUDA call (a compiled model breaks its graph here once, on its
        first call; run one eager call first to compile without the break)."""
        mods = [(self._down_module(), False), (self._up_module(), True)]
        if self.layout["gate"]:
            mods.append((getattr(self, self.layout["gate"]), True))
        with torch.no_grad():
            for mod, out_rows in mods:
                rows = self._rows(mod, out_rows)
                if not rows.is_contiguous():
                    flat = rows.contiguous()
                    mod.weight.data = flat.t() if out_rows == bool(self.layout["conv1d"]) else flat
            w_gate, w_up, _, _, w_down_t, _ = self.canonical()
            # pack() takes the shared part as a count of blocks of expert_size (self.n_shared counts neurons)
            self._kernel_cache = (k.pack(w_gate, w_up, w_down_t, self.expert_size, self.n_shared // self.expert_size),
                                  self.down_norms())

    def _kernels_pay(self, x2) -> bool:
        """SPARSE_MIN_MB's rule for this layer: its dense weights' bytes at the dtype of x2, its expert fraction."""
        weight_bytes = (3 if self.gated else 2) * self.intermediate * x2.shape[1] * x2.element_size()
        return sparse_pays_on_gpu(weight_bytes, self.expert_frac)

    def _cuda_forward(self, x2):
        if x2.shape[0] > self.dense_above_tokens or (self.size_rule and not self._kernels_pay(x2)):
            if self.stats is not None:  # every neuron and input channel computed, router not run
                full = torch.full((x2.shape[0],), self.n_experts, dtype=torch.long)
                cells = torch.full_like(full, self.intermediate * x2.shape[1])
                every = torch.full_like(full, self.intermediate)
                channels = torch.full_like(full, x2.shape[1])
                self.stats.update(full, cells, cells, every, False, every, channels, channels)
            return self._dense_forward(x2)
        k = _kernels()
        # the kernels count shared neurons in whole blocks of expert_size; kernels older than this file do not take
        # early decisions
        if self.n_shared % self.expert_size or (self.deciding and "decide_tau" not in getattr(k, "FEATURES", ())):
            return self._torch_forward(x2)
        if self._kernel_cache is None:  # a direct call (forward() builds it on the first CUDA call)
            self._build_kernel_cache(k)
        packed, norms = self._kernel_cache
        tau = None
        if self.down_tau > 0:
            tau = self._memo("tau", lambda: (self.down_tau, x2.dtype),
                             lambda: self.down_tau / norms.to(x2.dtype).clamp_min(1e-12))
        _, _, b_gate, b_up, _, b_model = self.canonical()
        bias = self.bias_now(x2)
        b_down = b_model
        if bias is not None:  # folded into the down bias the kernels add (built once per budget and down bias)
            down_key = None if b_model is None else (b_model.data_ptr(), b_model._version)
            b_down = self._memo("kernel_bias", lambda: (self._bias_key(x2), down_key),
                                lambda: bias if b_model is None else b_model + bias)
        dial = self.gated and self.gate_tau > 0
        # the kernels count, per token, the up rows they compute and the neurons kept for down (the torch path's
        # up_rows and down_keep): only when stats are on, as reading them back syncs
        counts = None if self.stats is None else torch.zeros(2, x2.shape[0], dtype=torch.int32, device=x2.device)
        # batch-1 decode of a layer calibrated to few experts: the compacted kernels (COMPACT_BELOW); else the
        # kernels' default (kernels.CONFIG["compact"], off unless a bench or DS_COMPACT=1 forces it). The argument
        # is passed only when set, so this file keeps working with kernels that predate it.
        extra = {"compact": True} if x2.shape[0] == 1 and self.expert_frac <= COMPACT_BELOW else {}
        r = self.router
        if self.threshold >= 1.0:
            T = x2.shape[0]
            mask = self._memo(("all_on", T), lambda: x2.device, lambda: self.select(x2))
        elif (counts is None and "routed_select" in getattr(k, "FEATURES", ())
              and k.routed_select_ok(x2.shape[0], extra.get("compact"), self.expert_size, self.n_experts, dial)):
            # the gate/up tiles apply the threshold rule to the logits themselves: one launch fewer
            mask = None
            extra.update(logits=k.route_logits(x2, r.w1.weight, r.w1.bias, r.w2.weight, r.w2.bias),
                         threshold=self.threshold)
        else:
            mask = k.route(x2, r.w1.weight, r.w1.bias, r.w2.weight, r.w2.bias, self.threshold)
        # input skip: applied by the kernels as they load x (no extra launch); kernels older than this file take
        # the cut input instead
        x_k = x2
        if self.input_tau > 0:
            if "input_tau" in getattr(k, "FEATURES", ()):
                extra["input_tau"] = self.input_tau
            else:
                x_k = self.sparse_input(x2)
        if self.deciding:
            extra["decide_tau"] = self.decide_tau
        y = k.sparse_mlp(x_k, packed, b_gate, b_up, b_down, mask, tau, self.act_name,
                         gate_scale=self.gate_scale if dial else None, gate_tau=self.gate_tau if dial else 0.0,
                         counts=counts, **extra)
        if counts is not None:
            self._record(x2, mask, counts[1], counts[0] if dial else None)
        return y


_KERNELS = []


def _kernels():
    """densesparse's Triton kernels, or None where densesparse or triton is absent (the torch path runs then)."""
    if not _KERNELS:
        try:
            from densesparse import kernels
        except ImportError:
            kernels = None
        _KERNELS.append(kernels)
    return _KERNELS[0]


# -- installing into a dense model, and the budget dial ---------------------------------------------------------------
def _get(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def install(model, spec: dict, cls: type | None = None) -> list[SparseMLP]:
    """Replace every FFN of `model` by a SparseMLP (or subclass `cls`) as the config's `densesparse` block says."""
    cls = cls or SparseMLP
    layout = spec["layout"]
    mlps = []
    for layer in _get(model, layout["layers"]):
        host = _get(layer, layout["container"])
        names = [n for n in (layout["gate"], layout["up"], layout["down"]) if n]
        parts = {n: getattr(host, n) for n in names}
        hidden = spec["hidden_size"]
        mlp = cls(layout, spec["activation"], parts, spec["n_shared"], spec["expert_size"],
                  spec["n_experts"], spec["router_width"], hidden)
        rows = mlp.canonical()[1].shape[0]
        if rows != mlp.intermediate:
            raise ValueError(f"the FFN has {rows} neurons but the densesparse config describes {mlp.intermediate} "
                             f"({spec['n_shared']} shared + {spec['n_experts']} x {spec['expert_size']})")
        if spec.get("bias_correction") and "budgets" in spec:
            mlp.budget_bias = nn.Parameter(torch.zeros(len(spec["budgets"]), hidden), requires_grad=False)
        mlp.router.to(dtype=parts[layout["up"]].weight.dtype, device=parts[layout["up"]].weight.device)
        if mlp.inline:
            setattr(layer, layout["up"], mlp)
            setattr(layer, layout["down"], HeldWeights(parts[layout["down"]]))
            mlp._down = (getattr(layer, layout["down"]),)
            setattr(layer, layout["act_slot"], nn.Identity())
        else:
            setattr(layer, layout["container"], mlp)
        mlps.append(mlp)
    return mlps


def sparse_mlps(model) -> list[SparseMLP]:
    return [m for m in model.modules() if getattr(m, "is_densesparse_mlp", False)]


@contextmanager
def sparse_function(mlps: list[SparseMLP]):
    """Meanwhile, calls on CUDA compute the sparse function instead of taking the dense MLP (many tokens, or a layer
    too small for the kernels to pay: what a perplexity or a quality budget measures); each layer's settings come
    back after."""
    saved = [(m.dense_above_tokens, m.size_rule) for m in mlps]
    for m in mlps:
        m.dense_above_tokens, m.size_rule = 1 << 30, False
    try:
        yield
    finally:
        for m, (tokens, rule) in zip(mlps, saved):
            m.dense_above_tokens, m.size_rule = tokens, rule


def apply_budget(mlps: list[SparseMLP], budgets: list[dict], target: float) -> None:
    """Set each layer's dials (router threshold, input, gate and down thresholds, early decisions) for an MLP-FLOPs
    target, and its calibrated fraction of selected experts (`expert_frac`, 1.0 where a spec predates it).

    `budgets` holds calibrated per-layer settings at a grid of targets; all-on (1.0) closes the grid. Between grid
    points the settings are interpolated linearly, since every dial moves FLOPs monotonically.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"mlp_flops={target} is outside (0, 1]: pass a fraction of the dense MLP FLOPs, e.g. 0.5")
    n = len(mlps)
    order = sorted(range(len(budgets)), key=lambda i: budgets[i]["target"])  # budget_bias rows follow `budgets`
    grid = [budgets[i] for i in order] + [
        {"target": 1.0, "thresholds": [1.0] * n, "down_tau": [0.0] * n, "input_tau": [0.0] * n, "gate_tau": [0.0] * n,
         "decide_tau": [0.0] * n, "expert_frac": [1.0] * n}]
    targets = [b["target"] for b in grid]
    if target < targets[0]:
        raise ValueError(f"mlp_flops={target} is below the smallest calibrated budget {targets[0]}: "
                         "run `densesparse calibrate` with a lower --min-budget")
    hi = bisect.bisect_left(targets, target)
    lo = max(hi - 1, 0)
    w = 1.0 if hi == lo else (target - targets[lo]) / (targets[hi] - targets[lo])
    a, b = grid[lo], grid[hi]
    # spec key -> module attribute, default where a spec predates the key (the first four are required)
    for key, attr, default in (("thresholds", "threshold", None), ("down_tau", "down_tau", None),
                               ("input_tau", "input_tau", None), ("gate_tau", "gate_tau", None),
                               ("decide_tau", "decide_tau", 0.0), ("expert_frac", "expert_frac", 1.0)):
        va, vb = (g[key] if default is None else g.get(key, [default] * n) for g in (a, b))
        for m, fa, fb in zip(mlps, va, vb):
            setattr(m, attr, fa + w * (fb - fa))
    # bias correction: interpolated like the dials (the dense end has none)
    for m in mlps:
        rows = getattr(m, "budget_bias", None)
        usable = rows is not None and rows.shape[0] == len(budgets) and target < 1.0
        m.bias_mix = (order[lo], order[hi] if hi < len(order) else None, w) if usable else None
