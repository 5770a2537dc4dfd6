"""Triton kernels for the expert-sparse MLP on CUDA (imported lazily, only when tensors are on CUDA).

Public API:
    route(x, r_w1, r_b1, r_w2, r_b2, threshold) -> mask [T, n_e] bool   (sync-free, graph-capturable)
    pack(w_gate, w_up, w_down_t, e, n_shared) -> dict                    (views of the weights + workspace)
    sparse_mlp(x, packed, b_gate, b_up, b_down, mask, tau, act, gate_scale=, gate_tau=, counts=) -> y [T, d]

No weight copies: pack() keeps references to the caller's [m, d] row-major w_gate, w_up and w_down_t (one row
per neuron; an expert's e rows are contiguous). It only copies a weight that is not contiguous, so callers that
want exactly one copy on the GPU pass contiguous [m, d] tensors (SparseMLP._cuda_forward re-lays the down
projection's storage in place, see runtime.py). Neuron n lives in block b = n // e (the n_shared shared blocks
first, then the n_e experts).

Paths (chosen by T on the host, no device sync):
  * T <= DECODE_MAX_T: Triton. Kernel 1 (_gate_up_kernel): one program per tile of BN neurons, gate+up gather
    GEMV/GEMM over the union of the tokens' experts, read straight from w_gate and w_up (unselected rows are
    predicated-off loads: no bytes move; tiles with no selected row exit at once), act(gate)*up, per-token mask
    and tau, h fp32 [T, m]. Gate dial (gate_tau > 0): the gate is computed first for the tile's selected rows and
    up rows are loaded only where some token keeps the neuron (|act(gate)| * gate_scale >= gate_tau; CONFIG
    "gu_two_phase"). Kernel 2 (_down_kernel): split-K over neurons x column blocks of d; a row of
    w_down_t is read only when some token's h is non-zero there (exact: h is 0 on unselected/tau-cut neurons);
    fp32 atomics into a per-layer workspace; the last program of each column block (atomic counter) adds b_down,
    writes y in the input dtype and re-zeroes the workspace and counter for the next call (CONFIG
    "dn_deterministic": per-program partials summed in a fixed order by that last program instead).
    Input skip (sparse_mlp(input_tau=)): the gate/up kernel cuts x as it loads it (no extra launch). It saves
    FLOPs, not bytes: gate and up rows are read whole (the gate stored by input channel, so that cut channels
    move no bytes, was measured slower on the H100: bench/GPU_NOTES.md, dial-mix round).
    CONFIG "compact" (off by default; DS_COMPACT=1): the compacted variant of both kernels: the active expert blocks
    are listed on the device (ascending, with their count: by _compact_kernel, or by every gate/up program itself),
    each gate/up program takes BN consecutive list rows (full tiles; programs past the count exit), h is stored
    compacted and the down kernel splits the active rows evenly over a fixed grid. Faster only at T=1 with few
    experts on the H100 (bench/GPU_NOTES.md, compaction and compact-rule rounds): sparse_mlp(compact=...) picks it
    per call, which SparseMLP does at T=1 for layers calibrated to <= runtime.COMPACT_BELOW of the experts.
  * T > DECODE_MAX_T: dense-with-mask: cuBLAS x @ w_gate^T and x @ w_up^T, one fused Triton kernel for
    act(g)*u*mask*tau (one pass, cheaper than the dense model's separate act and multiply), cuBLAS down.

Router: T <= 16: _r1_kernel (split over rows of r_w1 and over d, bf16 tensor-core dot, fp32 partials),
_r2_kernel (program per (BE experts, token): reduces the partials, relu, fp32 FMA against a [BE, r] tile of
r_w2), _select_kernel (exact sort-free XMoE rule, pairwise). CONFIG["router"] picks these three launches
("three", the default: fastest on the H100), R1 + _r2_select_kernel (the last R2 program of each token runs the
bisection select: two launches, "r2sel") or _route_fused_kernel (the three as phases of one persistent launch
with grid barriers, "persistent"); bench/GPU_NOTES.md has the timings. T > 16: cuBLAS layer 1 (bf16),
_r2_big_kernel (relu + bf16 tensor-core layer 2, fp32 logits), _select_bisect_kernel (one program per token:
bisection over the float bits of the cutoff probability, 31 CTA-wide sums: O(n_e log) not O(n_e^2)).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}

# What this version takes beyond the first API, for runtime.py (copied into every saved model directory, so it may
# meet older kernels): sparse_mlp(input_tau=), sparse_mlp(decide_tau=), route_logits() + sparse_mlp(logits=).
FEATURES = frozenset({"input_tau", "decide_tau", "routed_select"})

# Largest token count that takes the Triton decode kernels (they accept up to 16). Above it the union of the
# tokens' experts is nearly everything and cuBLAS over all rows is faster (see bench/GPU_NOTES.md).
DECODE_MAX_T = 2

# Tunables (the bench may override them to sweep; keys are read at every call).
CONFIG = {
    "gu_BN": 32, "gu_BK": 256, "gu_warps": 4, "gu_stages": 3,
    "dn_BN": 32, "dn_BD": 256, "dn_KCHUNK": 512, "dn_warps": 2, "dn_stages": 3,
    "r1_BR": 16, "r1_SPLIT": 16, "r2_BE": 32,
    # Select kernel at T <= 16 (pairwise XMoE rule): sel_BJ experts decided per program, their masses against
    # sel_BK logits per loop step (capped at the next power of two of n_e), sel_warps warps. Its loops are
    # latency-bound (each step waits on an L2 load): fewer, wider steps and more programs win. H100, llama3-8b
    # e=8 (1792 experts), T=1, profiler: 3.4 us at (16, 512, 4) (bench/results/gpu-h100.json, profile_layer) vs 6.9
    # at (64, 128, 4) (gpu-h100-compile-p1.json); the router alone, both in one run: select_trials in gpu-h100.json.
    "sel_BJ": 16, "sel_BK": 512, "sel_warps": 4,
    # Router at T <= 16 (DS_ROUTER overrides):
    #   "three": R1, R2, select (pairwise) as three launches.
    #   "r2sel": R1, then R2 + select in one launch (the last R2 program of a token selects it; bisection).
    #   "persistent": R1, R2, select as the phases of one persistent launch with two grid-wide barriers; measured
    #     slower on the H100 (run 7: 16.1 vs 11.1 us at T=1, 49.8 vs 20.2 at T=16: the barriers cost more than
    #     the launches they save).
    "router": os.environ.get("DS_ROUTER", "three"),
    # SparseMLP's decode calls (not counting, not compacted): R1 and R2 only, the gate/up tiles apply the XMoE rule
    # to the logits themselves (routed_select_ok; env DS_ROUTED_SELECT=0 opts out): the select launch is gone, and
    # each tile pays for comparing its experts with all n_e on its own critical path. H200, llama3-8b, router +
    # MLP side by side (bench/results/gpu-h200-routed-trials.json): T=1 kept 0.5 72.7 vs 74.1 us (e=8), 68.4 vs
    # 70.4 (e=32); T=2 90.5 vs 89.2 (e=8), 91.9 vs 91.7 (e=32): hence one-token calls only (routed_max_t). The
    # measured e=8 tiles compare 8 x 1792 = 14336 cells per token (gate dial) and 4 x 1792 without; routed_max_cells
    # keeps layers with more (small experts, many of them) on the select kernel, unmeasured there.
    "routed_select": os.environ.get("DS_ROUTED_SELECT", "1") == "1", "routed_max_t": 1, "routed_max_cells": 16384,
    # Decode down kernel: per-program partials summed in a fixed order by the last program (bit-identical calls)
    # instead of fp32 atomics (DS_DOWN_DET=0 opts out). On: same speed on the H100 (run B, e=8 router + MLP, T=1:
    # 89.7 vs 90.1 us at kept 0.5, 75.9 vs 75.3 at 0.25), and the atomics' last-bit noise was what made two equal
    # sparse decode steps of a 32-layer model differ (flipped near-tie experts from layer 3 on; bench/GPU_NOTES.md).
    "dn_deterministic": os.environ.get("DS_DOWN_DET", "1") == "1",
    # Gate dial in the gate/up kernel: True = gate K-loop, then an up K-loop that loads only the rows the gate keeps
    # (dropped rows move no bytes); False = one fused loop over gate and up, the gate cut applied in the epilogue.
    # With the dial the tile is gd_BN rows: the up loop reads about half of them; at 32 rows skipping them saved no
    # time (inferred: too few bytes in flight per iteration). H100, llama3-8b e=8, ~50% experts, gate keeping
    # ~50% of their up rows, MLP alone (run G2, bench/GPU_NOTES.md): T=1 two-phase 71.4 us at 64 rows vs 78.9 at
    # 32, fused 78.4 / 76.6, no dial 78.2; T=2 85.9 / 88.7, fused 95.3 / 94.1, no dial 100.7.
    "gu_two_phase": True, "gd_BN": 64,
    # Early decisions (decide_tau) double the gate/up kernel's dots per loaded tile; half the K step then pays:
    # H100, llama3-8b e=8, every expert on, the gate keeping 0.65 of the up rows, tau 0.40 of the neurons
    # (bench/results/gpu-h100-decide-cfgs.json): T=1 114.3 us at BK 256 vs 108.4 at 128 (the same call without early
    # decisions 102.9 at 256); T=2 124.5 vs 121.2 (120.5); 4 stages, 8 warps or gd_BN 32 were slower.
    "gu_dec_BK": 128,
    # Compacted decode path (CONFIG["compact"], env DS_COMPACT=1; off by default): the active expert blocks (the
    # shared ones and the union of the tokens' experts, ascending) and their count are listed on the device, no
    # sync: by every gate/up program itself (c_fused, env DS_COMPACT_FUSED; a prefix sum over the mask per program)
    # or by one extra _compact_kernel launch. Each gate/up program takes c_gu_BN (c_gd_BN with the gate dial)
    # consecutive rows of that list, so its tile is full (programs past the count exit at once), and stores h
    # compacted; the down kernel splits the active rows evenly over c_dn_split row chunks x column blocks (same
    # deterministic / atomics reduction). c_dn_skip: skip rows whose h is 0 for every token also without the dial
    # or down tau (there, it is always on). gu_BK / gu_warps / gu_stages are shared with the old path. H100,
    # llama3-8b (bench/GPU_NOTES.md, compaction round, run C6): a clear win only at T=1 with few experts (e=8
    # kept 0.25: MLP 69.0 -> 54.1 us); 2.7-3.4 us slower at T=1 kept 0.5, even at T=2 kept 0.25, 6-11 us slower
    # at T=2 kept 0.5 and 13.5 with the gate dial at T=2 (the list costs ~2.5 us, as a launch or as a prefix sum
    # in every gate/up program, and the gathered down rows run slower per row than the old path's), hence off.
    # This is the default of sparse_mlp(compact=None); SparseMLP passes compact=True per call at T=1 for layers
    # calibrated to at most runtime.COMPACT_BELOW (0.375) of the experts, where it was measured to win.
    "compact": os.environ.get("DS_COMPACT", "0") == "1",
    "c_gu_BN": 32, "c_gd_BN": 64, "c_dn_BN": 32, "c_dn_BD": 256, "c_dn_warps": 4, "c_dn_stages": 3,
    "c_dn_split": 28, "c_dn_skip": False, "c_BLOCK": 2048, "c_fused": os.environ.get("DS_COMPACT_FUSED", "1") == "1",
}
_BT = 16
_CNT_MIN_BD = 32
_BISECT_MAX = 16384  # largest n_e the one-program-per-token select kernel holds in registers
_SEL_ONE_MAX = 4096  # largest n_e (padded) a gate/up tile's routed selection loads in one piece
_ROUTED_MAX_T = 4  # most tokens of a routed-selection call (the tiles unroll their token loop)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return v / (1.0 + tl.exp(-v))
    elif ACT == 1:  # gelu, tanh approximation
        a = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        th = 2.0 / (1.0 + tl.exp(-2.0 * a)) - 1.0
        return 0.5 * v * (1.0 + th)
    elif ACT == 2:  # exact gelu
        return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    else:  # relu
        return tl.maximum(v, 0.0)


@triton.jit
def _load_x(x_ptr, offs_t, tok_ok, k, kmask, d, in_tau, HAS_IN: tl.constexpr):
    """x [BT, BK] at columns k; HAS_IN: the input cut applied on load (|x| < in_tau -> 0: input skip)."""
    xv = tl.load(x_ptr + offs_t[:, None] * d + k[None, :], mask=tok_ok[:, None] & kmask[None, :], other=0.0)
    if HAS_IN:
        xv = tl.where(tl.abs(xv) >= in_tau, xv, 0.0).to(xv.dtype)
    return xv


@triton.jit
def _selection(mask_ptr, offs_t, n, T, m, e, n_shared, n_e):
    """[BT, BN] bool: token t computes neuron n (its expert selected, or n shared)."""
    b = n // e
    ex = b - n_shared
    valid_n = n < m
    tok_ok = offs_t < T
    ld = tok_ok[:, None] & (valid_n & (ex >= 0))[None, :]
    sel = tl.load(mask_ptr + offs_t[:, None] * n_e + ex[None, :], mask=ld, other=0) != 0
    shared = (b < n_shared) & valid_n
    return sel | (tok_ok[:, None] & shared[None, :])


@triton.jit
def _routed_selection(s_ptr, thr, offs_t, n, T, m, e, n_shared, n_e, ALL: tl.constexpr, BJ: tl.constexpr,
                      SBK: tl.constexpr, ONE: tl.constexpr, RT: tl.constexpr):
    """[BT, BN] bool as _selection, with the XMoE rule decided here from the router logits s [T, n_e] (fp32) for
    the at most BJ experts this tile's neurons belong to (_pairwise_keep, the select kernel's rule): no select
    launch, no mask written or read. RT == T: the token loop is unrolled, so the tokens' logit loads are issued
    together; ONE: n_e <= SBK (_pairwise_keep)."""
    b = n // e
    ex = b - n_shared
    valid_n = n < m
    routed = valid_n & (ex >= 0)
    offs_j = tl.min(tl.where(routed, ex, n_e), axis=0) + tl.arange(0, BJ)
    jmask = offs_j < n_e
    sel = (offs_t[:, None] < 0) & routed[None, :]  # all False, [BT, BN]
    for t in tl.static_range(RT):
        keep = _pairwise_keep(s_ptr + t * n_e, offs_j, jmask, n_e, thr, ALL, BJ, SBK, "", ONE)
        hit = (ex[:, None] == offs_j[None, :]) & keep[None, :]
        mine = tl.max(hit.to(tl.int32), axis=1) > 0  # [BN]: the bit of each neuron's expert
        sel = sel | ((offs_t[:, None] == t) & mine[None, :])
    shared = (b < n_shared) & valid_n
    return sel | ((offs_t < T)[:, None] & shared[None, :])


@triton.jit
def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, mask_ptr, tau_ptr, gs_ptr, gate_tau, cnt_ptr, h_ptr,
                    blk_ptr, T, d, m, e, n_shared, n_e, in_tau, dec_tau, thr,
                    ROUTED: tl.constexpr, ALL: tl.constexpr, BJ: tl.constexpr, SBK: tl.constexpr,
                    ONE: tl.constexpr, RT: tl.constexpr,
                    GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, HAS_TAU: tl.constexpr,
                    GATE_DIAL: tl.constexpr, TWO_PHASE: tl.constexpr, COUNT: tl.constexpr, COMPACT: tl.constexpr,
                    FUSED: tl.constexpr, MT: tl.constexpr, CBLK: tl.constexpr,
                    HAS_IN: tl.constexpr, HAS_DEC: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr):
    """GATE_DIAL: a selected neuron is kept only where |act(gate)| * gs >= gate_tau. TWO_PHASE: the gate K-loop
    runs first and the up K-loop loads only rows some token keeps (dropped rows move no bytes); otherwise one fused
    loop reads every selected gate and up row and the gate cut is applied in the epilogue. COUNT: cnt [2, T] int32
    += per token (up rows computed, neurons kept for down), as SparseMLP's stats count them.
    COMPACT: blk_ptr = [count, active blocks ascending] (_compact_kernel); program p takes the compacted rows
    j in [p*BN, (p+1)*BN) (row j = neuron blk[j // e] * e + j % e), so its tile is full of selected rows, and
    stores h compacted (h[t, j]); programs with p*BN >= count*e exit at once. FUSED: no _compact_kernel launch:
    every program runs the prefix sum over the mask itself (_compact_own: MT >= T token rows, CBLK blocks a chunk),
    writes the list entries its own rows use and reads them back; program 0 writes the count (the down kernel reads
    the list). Else program p takes neurons [p*BN, (p+1)*BN) and h is in neuron order (tiles with no selected row
    store zeros). HAS_IN: x is cut as it is loaded (|x| < in_tau -> 0, input skip). HAS_DEC: early decisions, the
    gate dial and tau judge partial sums over the channels with |x| >= dec_tau (second accumulators on the same
    loads); the kept neurons' values are the full sums. ROUTED: mask_ptr holds the router's logits [T, n_e] (fp32)
    and each tile decides its own experts' selection at threshold thr (_routed_selection; not with COMPACT)."""
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BT)
    tok_ok = offs_t < T
    if COMPACT:
        if FUSED:
            R = _compact_own(mask_ptr, blk_ptr, pid, T, e, n_shared, n_e, BN, MT, CBLK) * e
        else:
            R = tl.load(blk_ptr) * e
        col = pid * BN + tl.arange(0, BN)
        cv = col < R
        bl = tl.load(blk_ptr + 1 + col // e, mask=cv, other=0, cache_modifier=".cg")
        n = tl.where(cv, bl * e + col % e, m)
    else:
        R = m
        n = pid * BN + tl.arange(0, BN)
        col = n
    if pid * BN < R:
        _gate_up_tile(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, mask_ptr, tau_ptr, gs_ptr, gate_tau, cnt_ptr, h_ptr,
                      n, col, offs_t, tok_ok, T, d, m, e, n_shared, n_e, in_tau, dec_tau, thr, ROUTED, ALL, BJ, SBK,
                      ONE, RT, GATED, HAS_BG, HAS_BU, HAS_TAU, GATE_DIAL, TWO_PHASE, COUNT, HAS_IN, HAS_DEC, ACT,
                      BT, BN, BK)


@triton.jit
def _active_chunk(mask_ptr, b0, offs_t, tok_ok, n_shared, n_e, BLOCK: tl.constexpr):
    """Blocks b0 .. b0 + BLOCK - 1 and which of them are active: a shared block, or an expert some token selects."""
    b = b0 + tl.arange(0, BLOCK)
    ex = b - n_shared
    ld = tok_ok[:, None] & ((ex >= 0) & (b < n_shared + n_e))[None, :]
    sv = tl.load(mask_ptr + offs_t[:, None] * n_e + ex[None, :], mask=ld, other=0)
    return b, (tl.max((sv != 0).to(tl.int32), axis=0) > 0) | (b < n_shared)


@triton.jit
def _list_blocks(mask_ptr, blk_ptr, T, n_shared, n_e, lo, hi, MT: tl.constexpr, CBLK: tl.constexpr):
    """Exclusive prefix sum over the active blocks (_active_chunk), chunk by chunk: stores blk[1 + rank] = block for
    the ranks in [lo, hi) and returns the count of active blocks."""
    offs_t = tl.arange(0, MT)
    tok_ok = offs_t < T
    base = tl.full([], 0, tl.int32)
    for b0 in range(0, n_shared + n_e, CBLK):
        b, act = _active_chunk(mask_ptr, b0, offs_t, tok_ok, n_shared, n_e, CBLK)
        a = act.to(tl.int32)
        rank = tl.cumsum(a, axis=0) + base - 1
        tl.store(blk_ptr + 1 + rank, b, mask=act & (rank >= lo) & (rank < hi))
        base += tl.sum(a, axis=0)
    return base


@triton.jit
def _compact_own(mask_ptr, blk_ptr, pid, T, e, n_shared, n_e, BN: tl.constexpr, MT: tl.constexpr,
                 CBLK: tl.constexpr):
    """The active-block count (as _compact_kernel), computed by this program alone; it stores the list entries
    (ranks) that its compacted rows [pid*BN, (pid+1)*BN) use, program 0 the count; a CTA barrier makes the stores
    visible to the program's own later (.cg) loads."""
    base = _list_blocks(mask_ptr, blk_ptr, T, n_shared, n_e, (pid * BN) // e, ((pid + 1) * BN - 1) // e + 1,
                        MT, CBLK)
    if pid == 0:
        tl.store(blk_ptr, base)
    tl.debug_barrier()
    return base


@triton.jit
def _early(xv, dec_tau):
    """x cut to the early decisions' channels (|x| >= dec_tau)."""
    return tl.where(tl.abs(xv) >= dec_tau, xv, 0.0).to(xv.dtype)


@triton.jit
def _gate_keep(sel, a, g_dec, gs, gate_tau, HAS_DEC: tl.constexpr, ACT: tl.constexpr):
    """The gate dial: the selected neurons whose |act(gate)| * gate_scale reaches gate_tau; deciding early, it
    judges the partial gate g_dec (bias included) instead of a = act(gate)."""
    a_dec = a
    if HAS_DEC:
        a_dec = _act(g_dec, ACT)
    return sel & (tl.abs(a_dec) * gs >= gate_tau)


@triton.jit
def _down_keep(keep, h, g_dec, u_dec, tau, GATED: tl.constexpr, HAS_DEC: tl.constexpr, ACT: tl.constexpr):
    """The down skip: the kept neurons whose |h| reaches tau; deciding early, h is taken from the partial sums
    g_dec and u_dec (biases included): act(g_dec) * u_dec, or act(u_dec) in an FFN without a gate."""
    crit = h
    if HAS_DEC:
        if GATED:
            crit = _act(g_dec, ACT) * u_dec
        else:
            crit = _act(u_dec, ACT)
    return keep & (tl.abs(crit) >= tau)


@triton.jit
def _gate_up_tile(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, mask_ptr, tau_ptr, gs_ptr, gate_tau, cnt_ptr, h_ptr,
                  n, col, offs_t, tok_ok, T, d, m, e, n_shared, n_e, in_tau, dec_tau, thr,
                  ROUTED: tl.constexpr, ALL: tl.constexpr, BJ: tl.constexpr, SBK: tl.constexpr,
                  ONE: tl.constexpr, RT: tl.constexpr,
                  GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, HAS_TAU: tl.constexpr,
                  GATE_DIAL: tl.constexpr, TWO_PHASE: tl.constexpr, COUNT: tl.constexpr,
                  HAS_IN: tl.constexpr, HAS_DEC: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
    """One tile of BN neurons n (n == m: no row); h goes to columns col of h_ptr [T, m]."""
    if ROUTED:
        sel = _routed_selection(mask_ptr, thr, offs_t, n, T, m, e, n_shared, n_e, ALL, BJ, SBK, ONE, RT)
    else:
        sel = _selection(mask_ptr, offs_t, n, T, m, e, n_shared, n_e)
    row_any = tl.max(sel.to(tl.int32), axis=0) > 0
    nmask = n < m
    h = tl.zeros([BT, BN], dtype=tl.float32)  # tiles with no selected row store zeros (the down kernel reads h)
    keep_u = sel
    keep = sel
    if tl.max(row_any.to(tl.int32), axis=0) > 0:
        row = n.to(tl.int64) * d
        offs_k = tl.arange(0, BK)
        acc_u = tl.zeros([BT, BN], dtype=tl.float32)
        acc_g = tl.zeros([BT, BN], dtype=tl.float32)
        # the early decisions' partial sums (HAS_DEC; else unused)
        dec_u = tl.zeros([BT, BN], dtype=tl.float32)
        dec_g = tl.zeros([BT, BN], dtype=tl.float32)
        if HAS_BG:
            bg = tl.load(bg_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if GATE_DIAL and TWO_PHASE:
            for k0 in range(0, d, BK):
                k = k0 + offs_k
                kmask = k < d
                xv = _load_x(x_ptr, offs_t, tok_ok, k, kmask, d, in_tau, HAS_IN)
                wg = tl.load(wg_ptr + row[:, None] + k[None, :], mask=row_any[:, None] & kmask[None, :], other=0.0)
                acc_g += tl.dot(xv, tl.trans(wg))
                if HAS_DEC:
                    dec_g += tl.dot(_early(xv, dec_tau), tl.trans(wg))
            if HAS_BG:
                acc_g += bg
            a = _act(acc_g, ACT)
            if HAS_DEC and HAS_BG:
                dec_g += bg
            gs = tl.load(gs_ptr + n, mask=nmask, other=0.0).to(tl.float32)
            keep_u = _gate_keep(sel, a, dec_g, gs[None, :], gate_tau, HAS_DEC, ACT)
            up_any = tl.max(keep_u.to(tl.int32), axis=0) > 0
            if tl.max(up_any.to(tl.int32), axis=0) > 0:
                for k0 in range(0, d, BK):
                    k = k0 + offs_k
                    kmask = k < d
                    xv = _load_x(x_ptr, offs_t, tok_ok, k, kmask, d, in_tau, HAS_IN)
                    wu = tl.load(wu_ptr + row[:, None] + k[None, :], mask=up_any[:, None] & kmask[None, :],
                                 other=0.0)
                    acc_u += tl.dot(xv, tl.trans(wu))
                    if HAS_DEC and HAS_TAU:
                        dec_u += tl.dot(_early(xv, dec_tau), tl.trans(wu))
        else:
            for k0 in range(0, d, BK):
                k = k0 + offs_k
                kmask = k < d
                xv = _load_x(x_ptr, offs_t, tok_ok, k, kmask, d, in_tau, HAS_IN)
                wm = row_any[:, None] & kmask[None, :]
                wu = tl.load(wu_ptr + row[:, None] + k[None, :], mask=wm, other=0.0)
                acc_u += tl.dot(xv, tl.trans(wu))
                if HAS_DEC:
                    x_dec = _early(xv, dec_tau)
                    if HAS_TAU:
                        dec_u += tl.dot(x_dec, tl.trans(wu))
                if GATED:
                    wg = tl.load(wg_ptr + row[:, None] + k[None, :], mask=wm, other=0.0)
                    acc_g += tl.dot(xv, tl.trans(wg))
                    if HAS_DEC:
                        dec_g += tl.dot(x_dec, tl.trans(wg))
            if GATED:
                if HAS_BG:
                    acc_g += bg
                    if HAS_DEC:
                        dec_g += bg
                a = _act(acc_g, ACT)
                if GATE_DIAL:
                    gs = tl.load(gs_ptr + n, mask=nmask, other=0.0).to(tl.float32)
                    keep_u = _gate_keep(sel, a, dec_g, gs[None, :], gate_tau, HAS_DEC, ACT)
        if HAS_BU:
            bu = tl.load(bu_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            acc_u += bu
        if GATED:
            h = a * acc_u
        else:
            h = _act(acc_u, ACT)
        keep = keep_u
        if HAS_TAU:
            tau = tl.load(tau_ptr + n, mask=nmask, other=0.0).to(tl.float32)
            if HAS_DEC and HAS_BU:
                dec_u += bu
            keep = _down_keep(keep, h, dec_g, dec_u, tau[None, :], GATED, HAS_DEC, ACT)
        h = tl.where(keep, h, 0.0)
    tl.store(h_ptr + offs_t[:, None] * m + col[None, :], h, mask=tok_ok[:, None] & nmask[None, :])
    if COUNT:
        tl.atomic_add(cnt_ptr + offs_t, tl.sum(keep_u.to(tl.int32), axis=1), mask=tok_ok, sem="relaxed")
        tl.atomic_add(cnt_ptr + T + offs_t, tl.sum(keep.to(tl.int32), axis=1), mask=tok_ok, sem="relaxed")


@triton.jit
def _down_rows(h_ptr, wd_ptr, blk_ptr, acc, s, hi, offs_t, tok_ok, offs_d, dmask, d, m, e, BN: tl.constexpr,
               SKIP: tl.constexpr, GATHER: tl.constexpr):
    """acc += h[:, j] @ w_down_t[row n] for the h columns j in [s, min(s + BN, hi)). GATHER: compacted rows, n =
    blk[j // e] * e + j % e; else h is in neuron order, n = j. SKIP: a row whose h is 0 for every token is not read
    (pays where the gate dial or down tau zero rows; on the compacted path without either, the weight loads then
    wait on no h load: measured ~1 us faster at T=1/2)."""
    j = s + tl.arange(0, BN)
    jv = j < hi
    if GATHER:
        bl = tl.load(blk_ptr + 1 + j // e, mask=jv, other=0)
        n = bl * e + j % e
    else:
        n = j
    hv = tl.load(h_ptr + offs_t[:, None] * m + j[None, :], mask=tok_ok[:, None] & jv[None, :], other=0.0)
    if SKIP:
        wm = (tl.max((hv != 0.0).to(tl.int32), axis=0) > 0)[:, None] & dmask[None, :]
    else:
        wm = jv[:, None] & dmask[None, :]
    wv = tl.load(wd_ptr + n.to(tl.int64)[:, None] * d + offs_d[None, :], mask=wm, other=0.0)
    return acc + tl.dot(hv.to(wv.dtype), wv)


@triton.jit
def _down_kernel(h_ptr, wd_ptr, bd_ptr, acc_ptr, cnt_ptr, y_ptr, blk_ptr,
                 T, d, m, e,
                 HAS_BD: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 KCHUNK: tl.constexpr, DET: tl.constexpr, NKP: tl.constexpr, CH: tl.constexpr,
                 COMPACT: tl.constexpr, SKIP: tl.constexpr):
    """DET: acc_ptr is a [n_programs(0), T, d] fp32 buffer; each program stores its partial there and the last one
    of a column block sums them in a fixed order (the same bits on every call). Else acc_ptr is the zeroed [BT, d]
    workspace: fp32 atomics (the summation order, so the last bit, varies between calls).
    COMPACT: h is compacted (h[t, j] for row j = neuron blk[j // e] * e + j % e, j < R = count * e, as the
    compacted gate/up kernel stores it); the R rows are split into n_programs(0) equal chunks (a multiple of BN,
    fixed by R: the same split, so the same bits, on every call with the same mask); programs past R store nothing
    and the last program sums only the used partials. Else program k takes neurons [k*KCHUNK, (k+1)*KCHUNK)."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    nk = tl.num_programs(0)
    offs_t = tl.arange(0, BT)
    tok_ok = offs_t < T
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < d
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    if COMPACT:
        R = tl.load(blk_ptr) * e
        C = tl.maximum(tl.cdiv(tl.cdiv(R, nk), BN) * BN, BN)
        lo = pid_k * C
        hi = tl.minimum(lo + C, R)
        n_used = tl.cdiv(R, C)
        for s in range(lo, hi, BN):
            acc = _down_rows(h_ptr, wd_ptr, blk_ptr, acc, s, hi, offs_t, tok_ok, offs_d, dmask, d, m, e, BN, SKIP,
                             True)
        has = pid_k < n_used
    else:
        n_used = nk
        has = pid_k < nk
        for s in range(0, KCHUNK, BN):  # rows with h 0 for every token are always skipped here
            acc = _down_rows(h_ptr, wd_ptr, blk_ptr, acc, pid_k * KCHUNK + s, m, offs_t, tok_ok, offs_d, dmask, d,
                             m, e, BN, True, False)
    omask = tok_ok[:, None] & dmask[None, :] & has
    optr = offs_t[:, None] * d + offs_d[None, :]
    if DET:
        tl.store(acc_ptr + pid_k * T * d + optr, acc, mask=omask)
    else:
        tl.atomic_add(acc_ptr + optr, acc, mask=omask, sem="relaxed")
    tl.debug_barrier()
    cnt = tl.atomic_add(cnt_ptr + pid_d, 1, sem="acq_rel")
    if cnt == nk - 1:
        omask = tok_ok[:, None] & dmask[None, :]
        if DET:
            offs_k = tl.arange(0, NKP)
            kmask = offs_k < n_used
            for t in range(T):
                for c in tl.static_range(0, BD, CH):
                    cols = pid_d * BD + c + tl.arange(0, CH)
                    cm = cols < d
                    pv = tl.load(acc_ptr + offs_k[:, None] * T * d + t * d + cols[None, :],
                                 mask=kmask[:, None] & cm[None, :], other=0.0, cache_modifier=".cg")
                    v = tl.sum(pv, axis=0)
                    if HAS_BD:
                        v += tl.load(bd_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                    tl.store(y_ptr + t * d + cols, v.to(y_ptr.dtype.element_ty), mask=cm)
        else:
            acc_bits = acc_ptr.to(tl.pointer_type(tl.int32))  # read-and-zero through the bit pattern
            v = tl.atomic_xchg(acc_bits + optr, tl.zeros([BT, BD], dtype=tl.int32), mask=omask, sem="acq_rel")
            v = v.to(tl.float32, bitcast=True)
            if HAS_BD:
                v += tl.load(bd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + optr, v.to(y_ptr.dtype.element_ty), mask=omask)
        tl.atomic_xchg(cnt_ptr + pid_d, 0)


@triton.jit
def _compact_kernel(mask_ptr, blk_ptr, T, n_shared, n_e, BT: tl.constexpr, BLOCK: tl.constexpr):
    """One program: blk = [count, the active blocks in ascending order]: the n_shared shared blocks and every
    expert some token selects (the union over the T tokens)."""
    tl.store(blk_ptr, _list_blocks(mask_ptr, blk_ptr, T, n_shared, n_e, 0, n_shared + n_e, BT, BLOCK))


@triton.jit
def _mask_act_kernel(g_ptr, u_ptr, gd_ptr, ud_ptr, bg_ptr, bu_ptr, mask_ptr, tau_ptr, gs_ptr, gate_tau, cnt_ptr,
                     h_ptr, T, m, e, n_shared, n_e,
                     GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, HAS_TAU: tl.constexpr,
                     GATE_DIAL: tl.constexpr, COUNT: tl.constexpr, HAS_DEC: tl.constexpr, ACT: tl.constexpr,
                     BLOCK: tl.constexpr):
    """h = act(g) * u (or act(u)) on the selected neurons the dials keep; HAS_DEC: the dials judge gd / ud, the
    early decisions' partial sums, instead of g / u."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    nmask = n < m
    b = n // e
    ex = b - n_shared
    sel = tl.load(mask_ptr + t * n_e + ex, mask=nmask & (ex >= 0), other=0) != 0
    sel = (sel | (b < n_shared)) & nmask
    u = tl.load(u_ptr + t * m + n, mask=sel, other=0.0).to(tl.float32)
    if HAS_BU:
        bu = tl.load(bu_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        u += bu
    keep_u = sel
    if GATED:
        g = tl.load(g_ptr + t * m + n, mask=sel, other=0.0).to(tl.float32)
        if HAS_BG:
            bg = tl.load(bg_ptr + n, mask=nmask, other=0.0).to(tl.float32)
            g += bg
        a = _act(g, ACT)
        g_dec = g
        if HAS_DEC:
            g_dec = tl.load(gd_ptr + t * m + n, mask=sel, other=0.0).to(tl.float32)
            if HAS_BG:
                g_dec += bg
        if GATE_DIAL:
            gs = tl.load(gs_ptr + n, mask=nmask, other=0.0).to(tl.float32)
            keep_u = _gate_keep(sel, a, g_dec, gs, gate_tau, HAS_DEC, ACT)
        h = a * u
    else:
        h = _act(u, ACT)
    keep = keep_u
    if HAS_TAU:
        tau = tl.load(tau_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        u_dec = u
        if HAS_DEC:
            u_dec = tl.load(ud_ptr + t * m + n, mask=sel, other=0.0).to(tl.float32)
            if HAS_BU:
                u_dec += bu
        keep = _down_keep(keep, h, g_dec if GATED else h, u_dec, tau, GATED, HAS_DEC, ACT)
    h = tl.where(keep, h, 0.0)
    tl.store(h_ptr + t * m + n, h.to(h_ptr.dtype.element_ty), mask=nmask)
    if COUNT:
        tl.atomic_add(cnt_ptr + t, tl.sum(keep_u.to(tl.int32), axis=0), sem="relaxed")
        tl.atomic_add(cnt_ptr + T + t, tl.sum(keep.to(tl.int32), axis=0), sem="relaxed")


@triton.jit
def _r1_tile(x_ptr, w1_ptr, part_ptr, pid_r, pid_s, T, d, r, KLEN,
             BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """part[s, t, i] = sum over the s-th slice of d of x[t, k] * w1[i, k], for the BR rows of tile pid_r."""
    rows = pid_r * BR + tl.arange(0, BR)
    rmask = rows < r
    offs_t = tl.arange(0, BT)
    tok_ok = offs_t < T
    acc = tl.zeros([BT, BR], dtype=tl.float32)
    k_begin = pid_s * KLEN
    for k0 in range(0, KLEN, BK):
        k = k_begin + k0 + tl.arange(0, BK)
        kmask = (k < d) & (k < k_begin + KLEN)
        xv = tl.load(x_ptr + offs_t[:, None] * d + k[None, :], mask=tok_ok[:, None] & kmask[None, :], other=0.0)
        wv = tl.load(w1_ptr + rows[:, None] * d + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(xv, tl.trans(wv))
    tl.store(part_ptr + pid_s * T * r + offs_t[:, None] * r + rows[None, :], acc,
             mask=tok_ok[:, None] & rmask[None, :])


@triton.jit
def _r1_kernel(x_ptr, w1_ptr, part_ptr, T, d, r, KLEN,
               BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """_r1_tile of program (row tile, d slice)."""
    _r1_tile(x_ptr, w1_ptr, part_ptr, tl.program_id(0), tl.program_id(1), T, d, r, KLEN, BT, BR, BK)


@triton.jit
def _r2_logits(part_ptr, b1_ptr, w2_ptr, b2_ptr, t, ex, emask, T, r, SPLIT,
               HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr,
               CACHE: tl.constexpr):
    """Token t's logits for experts ex [BE] in fp32: relu(sum_s part[s, t, :] + b1) . w2[ex, :] + b2[ex] (FMA,
    exact products). Shared by _r2_kernel, _r2_select_kernel and the persistent router so every path computes the
    same logits. CACHE ".cg": the partials were written by other programs of the same launch, so read them from L2,
    not a stale L1."""
    offs_r = tl.arange(0, RP)
    rmask = offs_r < r
    offs_s = tl.arange(0, SP)
    pmask = (offs_s < SPLIT)[:, None] & rmask[None, :]
    pv = tl.load(part_ptr + offs_s[:, None] * T * r + t * r + offs_r[None, :], mask=pmask, other=0.0,
                 cache_modifier=CACHE)
    w2 = tl.load(w2_ptr + ex[:, None] * r + offs_r[None, :], mask=emask[:, None] & rmask[None, :],
                 other=0.0).to(tl.float32)
    h1 = tl.sum(pv, axis=0)
    if HAS_B1:
        h1 += tl.load(b1_ptr + offs_r, mask=rmask, other=0.0).to(tl.float32)
    h1 = tl.maximum(h1, 0.0)
    s = tl.sum(w2 * h1[None, :], axis=1)
    if HAS_B2:
        s += tl.load(b2_ptr + ex, mask=emask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _r2_kernel(part_ptr, b1_ptr, w2_ptr, b2_ptr, s_ptr, T, r, n_e, SPLIT,
               HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
               BE: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr):
    """logits[t, j] = relu(sum_s part[s, t, :] + b1) . w2[j, :] + b2[j], fp32 FMA (exact products).

    Program (expert tile, token): loads the [BE, r] tile of w2 (L2-resident after the first token), reduces the
    token's [SPLIT, r] partials (one 2-D load), relu, one row-reduction gives BE logits. Tokens run in parallel."""
    t = tl.program_id(1)
    ex = tl.program_id(0) * BE + tl.arange(0, BE)
    emask = ex < n_e
    s = _r2_logits(part_ptr, b1_ptr, w2_ptr, b2_ptr, t, ex, emask, T, r, SPLIT, HAS_B1, HAS_B2, RP, SP, "")
    tl.store(s_ptr + t * n_e + ex, s, mask=emask)


@triton.jit
def _r2_big_kernel(h1_ptr, w2_ptr, b2_ptr, s_ptr, T, r, n_e,
                   HAS_B2: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, RP: tl.constexpr):
    """logits [T, n_e] fp32 = relu(h1) @ w2^T + b2, bf16/fp16 tensor-core dot with fp32 accumulation."""
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    ex = pid_e * BE + tl.arange(0, BE)
    offs_r = tl.arange(0, RP)
    tmask = offs_t < T
    emask = ex < n_e
    rmask = offs_r < r
    h = tl.load(h1_ptr + offs_t.to(tl.int64)[:, None] * r + offs_r[None, :], mask=tmask[:, None] & rmask[None, :],
                other=0.0)
    h = tl.maximum(h, 0.0)
    w = tl.load(w2_ptr + ex[:, None] * r + offs_r[None, :], mask=emask[:, None] & rmask[None, :], other=0.0)
    acc = tl.dot(h, tl.trans(w.to(h.dtype)))
    if HAS_B2:
        acc += tl.load(b2_ptr + ex, mask=emask, other=0.0).to(tl.float32)[None, :]
    tl.store(s_ptr + offs_t.to(tl.int64)[:, None] * n_e + ex[None, :], acc, mask=tmask[:, None] & emask[None, :])


@triton.jit
def _pairwise_keep(row, offs_j, jmask, n_e, thr, ALL: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                   CACHE: tl.constexpr, ONE: tl.constexpr):
    """XMoE rule on softmax(row[0:n_e]) for the experts offs_j: keep j iff the mass of the experts with larger p is
    < thr.

    Sort-free and exact: q = exp(s - max) (monotone in p); sums, over all k, q_k where q_k > q_j (pairwise,
    accumulated elementwise, one reduction at the end); keep j iff that mass < thr * sum(q). Ties: experts with
    equal p do not count as ranked before each other. CACHE ".cg": logits written by other programs of the same
    launch are read from L2. ONE (n_e <= BK): the logits are loaded once and kept in registers (one memory round
    trip instead of two per BK chunk)."""
    qj = tl.load(row + offs_j, mask=jmask, other=float("-inf"), cache_modifier=CACHE)
    offs_k = tl.arange(0, BK)
    if ONE:
        v = tl.load(row + offs_k, mask=offs_k < n_e, other=float("-inf"), cache_modifier=CACHE)
        smax = tl.max(v, axis=0)
        qk = tl.exp(v - smax)
        qj = tl.exp(qj - smax)
        z = tl.sum(qk, axis=0)
        mass = tl.sum(tl.where(qk[None, :] > qj[:, None], qk[None, :], 0.0), axis=1)
    else:
        mx = tl.full([BK], float("-inf"), tl.float32)
        for c in range(0, n_e, BK):
            v = tl.load(row + c + offs_k, mask=c + offs_k < n_e, other=float("-inf"), cache_modifier=CACHE)
            mx = tl.maximum(mx, v)
        smax = tl.max(mx, axis=0)
        qj = tl.exp(qj - smax)
        zacc = tl.zeros([BK], dtype=tl.float32)
        macc = tl.zeros([BJ, BK], dtype=tl.float32)
        for c in range(0, n_e, BK):
            qk = tl.exp(tl.load(row + c + offs_k, mask=c + offs_k < n_e, other=float("-inf"),
                                cache_modifier=CACHE) - smax)
            zacc += qk
            if not ALL:
                macc += tl.where(qk[None, :] > qj[:, None], qk[None, :], 0.0)
        z = tl.sum(zacc, axis=0)
        mass = tl.sum(macc, axis=1)
    if ALL:
        keep = jmask
    else:
        keep = jmask & (mass < thr * z)
    return keep


@triton.jit
def _select_block(s_ptr, out_ptr, t, jb, n_e, thr, ALL: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                  CACHE: tl.constexpr):
    """_pairwise_keep for the experts of block jb of token t, stored as mask bits."""
    offs_j = jb * BJ + tl.arange(0, BJ)
    jmask = offs_j < n_e
    keep = _pairwise_keep(s_ptr + t * n_e, offs_j, jmask, n_e, thr, ALL, BJ, BK, CACHE, False)
    tl.store(out_ptr + t * n_e + offs_j, keep.to(tl.uint8), mask=jmask)


@triton.jit
def _select_kernel(s_ptr, out_ptr, n_e, thr, ALL: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
    """_select_block of program (token, expert block)."""
    _select_block(s_ptr, out_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), n_e, thr, ALL, BJ, BK, "")


@triton.jit
def _bisect_keep(s, msk, thr, ALL: tl.constexpr):
    """XMoE rule on one token's logits s [BLOCK] (masked-off entries -inf), O(n_e log): S(v) = sum of q_k > v is
    non-increasing in v, so {v : S(v) < thr*Z} = [v*, inf) and keep j iff q_j >= v*. v* is found exactly by
    bisection over the bit patterns of non-negative floats (ordered like their values) in [0, 1] (q_max = 1)."""
    if ALL:
        keep = msk
    else:
        q = tl.exp(s - tl.max(s, axis=0))
        q = tl.where(msk, q, 0.0)
        c = thr * tl.sum(q, axis=0)
        lo = tl.program_id(0) * 0  # an int32 scalar
        hi = lo + 0x3F800000  # bits of 1.0: S(1.0) = 0
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            sv = tl.sum(tl.where(q > mid.to(tl.float32, bitcast=True), q, 0.0), axis=0)
            go = sv < c
            hi = tl.where(go, mid, hi)
            lo = tl.where(go, lo, mid + 1)
        keep = msk & (q >= hi.to(tl.float32, bitcast=True))
    return keep


@triton.jit
def _select_bisect_kernel(s_ptr, out_ptr, n_e, thr, ALL: tl.constexpr, BLOCK: tl.constexpr):
    """Same rule as _select_kernel, one program per token (_bisect_keep: 31 CTA-wide sums)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    msk = offs < n_e
    s = tl.load(s_ptr + t * n_e + offs, mask=msk, other=float("-inf"))
    keep = _bisect_keep(s, msk, thr, ALL)
    tl.store(out_ptr + t * n_e + offs, keep.to(tl.uint8), mask=msk)


@triton.jit
def _r2_select_kernel(part_ptr, b1_ptr, w2_ptr, b2_ptr, s_ptr, out_ptr, cnt_ptr, T, r, n_e, SPLIT, thr,
                      HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ALL: tl.constexpr,
                      BE: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr):
    """_r2_kernel, then the selection of token t by the last of its programs to finish (no second launch, no
    spinning): each program stores its BE logits and bumps the token's counter (acq_rel); the one that sees
    n_programs - 1 reads the token's n_e logits from L2 (.cg), runs _bisect_keep, writes the mask row and re-zeroes
    the counter for the next call."""
    t = tl.program_id(1)
    ex = tl.program_id(0) * BE + tl.arange(0, BE)
    emask = ex < n_e
    sv = _r2_logits(part_ptr, b1_ptr, w2_ptr, b2_ptr, t, ex, emask, T, r, SPLIT, HAS_B1, HAS_B2, RP, SP, "")
    tl.store(s_ptr + t * n_e + ex, sv, mask=emask)
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        offs = tl.arange(0, BLOCK)
        msk = offs < n_e
        s = tl.load(s_ptr + t * n_e + offs, mask=msk, other=float("-inf"), cache_modifier=".cg")
        keep = _bisect_keep(s, msk, thr, ALL)
        tl.store(out_ptr + t * n_e + offs, keep.to(tl.uint8), mask=msk)
        tl.atomic_xchg(cnt_ptr + t, 0, sem="relaxed", scope="gpu")


@triton.jit
def _grid_sync(bar_ptr, n_prog, MAX_SPIN: tl.constexpr):
    """Grid-wide barrier for a persistent grid (n_prog programs, all co-resident: n_prog <= SM count). The spin is
    bounded (MAX_SPIN polls) so a broken assumption gives a wrong mask that the tests catch, never a hang."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    i = seen * 0
    while (seen < n_prog) & (i < MAX_SPIN):
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        i += 1
    tl.debug_barrier()


@triton.jit
def _route_fused_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, part_ptr, s_ptr, out_ptr, bar_ptr,
                        T, d, r, n_e, KLEN, SPLIT, thr, n_prog,
                        HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ALL: tl.constexpr,
                        BT: tl.constexpr, BR: tl.constexpr, BK1: tl.constexpr,
                        BE: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr,
                        BJ: tl.constexpr, BK: tl.constexpr, MAX_SPIN: tl.constexpr):
    """_r1_kernel, _r2_kernel and _select_kernel (the same _r1_tile and _r2_logits; selection pairwise) as
    three phases of one persistent launch: each program loops over the phase's work items; phases are separated
    by grid barriers (bar_ptr[0], bar_ptr[1]); the last program to finish re-zeroes the three counters for the
    next call. Cross-program data (partials, logits) is read with .cg loads (L2, not a stale L1)."""
    pid = tl.program_id(0)
    # phase 1: partials part[s, t, i] = x[t, slice s] . w1[i, slice s]
    n_r = tl.cdiv(r, BR)
    for item in range(pid, n_r * SPLIT, n_prog):
        _r1_tile(x_ptr, w1_ptr, part_ptr, item % n_r, item // n_r, T, d, r, KLEN, BT, BR, BK1)
    _grid_sync(bar_ptr, n_prog, MAX_SPIN)
    # phase 2: logits[t, j] = relu(sum_s part[s, t, :] + b1) . w2[j, :] + b2[j]
    n_eb = tl.cdiv(n_e, BE)
    for item in range(pid, n_eb * T, n_prog):
        eb = item % n_eb
        t = item // n_eb
        ex = eb * BE + tl.arange(0, BE)
        emask = ex < n_e
        sv = _r2_logits(part_ptr, b1_ptr, w2_ptr, b2_ptr, t, ex, emask, T, r, SPLIT, HAS_B1, HAS_B2, RP, SP, ".cg")
        tl.store(s_ptr + t * n_e + ex, sv, mask=emask)
    _grid_sync(bar_ptr + 1, n_prog, MAX_SPIN)
    # phase 3: the XMoE rule, pairwise (as _select_kernel)
    n_jb = tl.cdiv(n_e, BJ)
    for item in range(pid, T * n_jb, n_prog):
        _select_block(s_ptr, out_ptr, (item // n_jb).to(tl.int64), item % n_jb, n_e, thr, ALL, BJ, BK, ".cg")
    # every program has passed both barriers once it gets here: the last one re-zeroes the counters
    tl.debug_barrier()
    done = tl.atomic_add(bar_ptr + 2, 1, sem="acq_rel", scope="gpu")
    if done == n_prog - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(bar_ptr + 2, 0, sem="relaxed", scope="gpu")


# device -> int32[4 + _BT] router counters (every call leaves them zeroed): [0:3] the persistent router's barriers,
# [4:4 + _BT] the r2sel router's per-token arrival counts. Shared by all calls on a device: calls must not run
# concurrently on two streams.
_ROUTER_BAR = {}
_SMS = {}


def _router_bar(dev):
    """The router's counters for `dev`, made on first use; None while a graph is being captured and none exist
    yet (an allocation then would come from the graph's pool): the three-launch path runs instead."""
    key = (dev.type, dev.index if dev.index is not None else torch.cuda.current_device())
    if key not in _ROUTER_BAR:
        if torch.cuda.is_current_stream_capturing():
            return None, 0
        _ROUTER_BAR[key] = torch.zeros(4 + _BT, device=dev, dtype=torch.int32)
        _SMS[key] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _ROUTER_BAR[key], _SMS[key]


# ----------------------------------------------------------------------------------------------------------------
# Host wrappers (raw, not registered)
# ----------------------------------------------------------------------------------------------------------------
def _r1_slices(d: int) -> tuple[int, int, int]:
    """R1's split of d: (slices, slice length, K step)."""
    bk = 128
    klen = triton.cdiv(triton.cdiv(d, CONFIG["r1_SPLIT"]), bk) * bk
    return triton.cdiv(d, klen), klen, bk


def _r1_launch(x, w1, part, klen, bk):
    T, d = x.shape
    r = w1.shape[0]
    _r1_kernel[(triton.cdiv(r, CONFIG["r1_BR"]), part.shape[0])](x, w1, part, T, d, r, klen,
                                                                BT=_BT, BR=CONFIG["r1_BR"], BK=bk, num_warps=4)


def _logits_impl(x: Tensor, r_w1: Tensor, r_b1: Optional[Tensor], r_w2: Tensor, r_b2: Optional[Tensor]) -> Tensor:
    """The router's logits [T, n_e] fp32 at T <= 16: R1, then R2 (the three-launch router's first two launches)."""
    x = x.contiguous()
    T, d = x.shape
    if T > _BT:
        raise ValueError(f"router logits: at most {_BT} tokens")
    r = r_w1.shape[0]
    n_e = r_w2.shape[0]
    split, klen, bk = _r1_slices(d)
    part = torch.empty((split, T, r), device=x.device, dtype=torch.float32)
    logits = torch.empty((T, n_e), device=x.device, dtype=torch.float32)
    _r1_launch(x, r_w1.contiguous().to(x.dtype), part, klen, bk)
    be = CONFIG["r2_BE"]
    rp = max(16, triton.next_power_of_2(r))
    _r2_kernel[(triton.cdiv(n_e, be), T)](
        part, r_b1 if r_b1 is not None else part, r_w2.contiguous(), r_b2 if r_b2 is not None else part,
        logits, T, r, n_e, split, HAS_B1=r_b1 is not None, HAS_B2=r_b2 is not None,
        BE=be, RP=rp, SP=triton.next_power_of_2(split), num_warps=4 if be * rp >= 4096 else 2)
    return logits


def _route_impl(x: Tensor, r_w1: Tensor, r_b1: Optional[Tensor], r_w2: Tensor, r_b2: Optional[Tensor],
                threshold: float) -> Tensor:
    x = x.contiguous()
    T, d = x.shape
    r = r_w1.shape[0]
    n_e = r_w2.shape[0]
    dev = x.device
    w2 = r_w2.contiguous()
    rp = max(16, triton.next_power_of_2(r))
    mode = CONFIG["router"]
    if mode not in ("three", "r2sel", "persistent"):
        raise ValueError(f"CONFIG['router'] = {mode!r}: use 'three', 'r2sel' or 'persistent'")
    if mode == "r2sel" and n_e > _BISECT_MAX:
        mode = "three"
    bar, n_sm = _router_bar(x.device) if T <= _BT and mode != "three" else (None, 0)
    if T <= _BT and bar is None:
        logits = _logits_impl(x, r_w1, r_b1, r_w2, r_b2)
    elif T <= _BT:
        cfg = CONFIG
        split, klen, bk = _r1_slices(d)
        part = torch.empty((split, T, r), device=dev, dtype=torch.float32)
        logits = torch.empty((T, n_e), device=dev, dtype=torch.float32)
        w1 = r_w1.contiguous().to(x.dtype)
        dummy = part
        be = cfg["r2_BE"]
        out = torch.empty((T, n_e), device=dev, dtype=torch.uint8)
        if mode == "persistent":
            bj = min(64, max(16, triton.next_power_of_2(n_e)))
            bks = min(128, max(16, triton.next_power_of_2(n_e)))
            n_work = max(triton.cdiv(r, cfg["r1_BR"]) * split, triton.cdiv(n_e, be) * T, T * triton.cdiv(n_e, bj))
            n_prog = max(1, min(n_work, n_sm))  # persistent grid: at most one program per SM, all co-resident
            _route_fused_kernel[(n_prog,)](
                x, w1, r_b1 if r_b1 is not None else dummy, w2, r_b2 if r_b2 is not None else dummy, part, logits,
                out, bar, T, d, r, n_e, klen, split, float(threshold), n_prog,
                HAS_B1=r_b1 is not None, HAS_B2=r_b2 is not None, ALL=bool(threshold >= 1.0),
                BT=_BT, BR=cfg["r1_BR"], BK1=bk, BE=be, RP=rp, SP=triton.next_power_of_2(split), BJ=bj, BK=bks,
                MAX_SPIN=1 << 18, num_warps=4)
            return out.view(torch.bool)
        _r1_launch(x, w1, part, klen, bk)
        blk = max(16, triton.next_power_of_2(n_e))
        _r2_select_kernel[(triton.cdiv(n_e, be), T)](
            part, r_b1 if r_b1 is not None else dummy, w2, r_b2 if r_b2 is not None else dummy,
            logits, out, bar[4:], T, r, n_e, split, float(threshold),
            HAS_B1=r_b1 is not None, HAS_B2=r_b2 is not None, ALL=bool(threshold >= 1.0),
            BE=be, RP=rp, SP=triton.next_power_of_2(split), BLOCK=blk,
            num_warps=max(4, min(16, blk // 256)))
        return out.view(torch.bool)
    else:
        logits = torch.empty((T, n_e), device=dev, dtype=torch.float32)
        h1 = torch.nn.functional.linear(x, r_w1.to(x.dtype), None if r_b1 is None else r_b1.to(x.dtype))
        bt, be = 64, 128
        _r2_big_kernel[(triton.cdiv(T, bt), triton.cdiv(n_e, be))](
            h1, w2, r_b2 if r_b2 is not None else logits, logits, T, r, n_e, HAS_B2=r_b2 is not None,
            BT=bt, BE=be, RP=rp, num_warps=4)
    out = torch.empty((T, n_e), device=dev, dtype=torch.uint8)
    all_on = bool(threshold >= 1.0)
    if T > _BT and n_e <= _BISECT_MAX:
        blk = max(16, triton.next_power_of_2(n_e))
        _select_bisect_kernel[(T,)](logits, out, n_e, float(threshold), ALL=all_on, BLOCK=blk,
                                    num_warps=max(1, min(16, blk // 256)))
    else:
        small = T <= _BT
        bj = min(CONFIG["sel_BJ"] if small else 64, max(16, triton.next_power_of_2(n_e)))
        bk = min(CONFIG["sel_BK"] if small else 128, max(16, triton.next_power_of_2(n_e)))
        _select_kernel[(T, triton.cdiv(n_e, bj))](logits, out, n_e, float(threshold), ALL=all_on,
                                                  BJ=bj, BK=bk, num_warps=CONFIG["sel_warps"] if small else 4)
    return out.view(torch.bool)


def _active_blocks(mk, n_shared):
    """int32 [1 + n_shared + n_e]: [count, the active blocks in ascending order, then unwritten], on the device
    (no sync, graph-capturable): the shared blocks and the experts some token of mk [T, n_e] (uint8) selects."""
    T, n_e = mk.shape
    blk = torch.empty((n_shared + n_e + 1,), device=mk.device, dtype=torch.int32)
    _compact_kernel[(1,)](mk, blk, T, n_shared, n_e, BT=max(2, triton.next_power_of_2(T)), BLOCK=CONFIG["c_BLOCK"],
                          num_warps=4)
    return blk


def active_blocks(mask: Tensor, n_shared: int) -> Tensor:
    """The compacted path's block list (tests, bench): see _active_blocks."""
    mask = mask.contiguous()
    return _active_blocks(mask.view(torch.uint8) if mask.dtype == torch.bool else mask, n_shared)


@functools.lru_cache(maxsize=256)
def _in_dtype(v: float, dtype) -> float:
    """v rounded to dtype: torch compares a bf16/fp16 tensor with a Python float in that dtype, the kernels in fp32.
    Cached: a layer passes the same threshold on every decode call (no tensor built on the host each time)."""
    return float(torch.tensor(v, dtype=dtype))


def _tile_experts(bn: int, e: int) -> int:
    """A power of two >= the experts a tile of bn consecutive neurons (starting at a multiple of bn) meets."""
    if bn % e == 0:
        n = bn // e
    elif e % bn == 0:
        n = 1
    else:
        n = (bn - 1) // e + 2
    return max(2, triton.next_power_of_2(n))


def _decode_impl(x, w_gate, w_up, w_dt, b_gate, b_up, b_down, mask, tau, gate_scale, gate_tau, counts, acc, cnt, e,
                 n_shared, act, compact, input_tau, decide_tau, logits=None, threshold=1.0):
    """mask [T, n_e] selects the experts; or mask None and logits [T, n_e] (fp32, route_logits): the gate/up tiles
    apply the XMoE rule at threshold themselves (not with compact, whose block list needs the mask)."""
    T, d = x.shape
    m = w_dt.shape[0]
    routed = logits is not None
    n_e = (logits if routed else mask).shape[1]
    cfg = CONFIG
    h = torch.empty((T, m), device=x.device, dtype=torch.float32)
    dummy = h
    if routed:
        mk = logits
    else:
        mk = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    gated = w_gate is not None
    dial = gated and gate_scale is not None and gate_tau > 0
    compact = bool(compact)
    if routed and compact:
        raise ValueError("the routed selection (logits=) runs on the non-compacted decode path only")
    # the routed selection holds a token's logits in registers up to _SEL_ONE_MAX experts, else loops over chunks
    p2 = max(16, triton.next_power_of_2(n_e))
    sbk = p2 if p2 <= _SEL_ONE_MAX else cfg["sel_BK"]
    pre = "c_" if compact else ""
    bn = cfg[pre + "gd_BN"] if dial else cfg[pre + "gu_BN"]
    fused = compact and bool(cfg["c_fused"])
    if fused:  # the gate/up programs write the list themselves
        blk = torch.empty((n_shared + n_e + 1,), device=x.device, dtype=torch.int32)
    else:
        blk = _active_blocks(mk, n_shared) if compact else dummy
    nb = n_shared + n_e
    has_in = input_tau > 0
    in_tau = _in_dtype(input_tau, x.dtype) if has_in else 0.0
    has_dec = decide_tau > 0
    dec_tau = _in_dtype(decide_tau, x.dtype) if has_dec else 0.0
    _gate_up_kernel[(triton.cdiv(m, bn),)](
        x, w_gate if gated else w_up, w_up, b_gate if b_gate is not None else dummy,
        b_up if b_up is not None else dummy, mk, tau if tau is not None else dummy,
        gate_scale if dial else dummy, float(gate_tau) if dial else 0.0, counts if counts is not None else dummy,
        h, blk, T, d, m, e, n_shared, n_e, in_tau, dec_tau, float(threshold),
        ROUTED=routed, ALL=bool(threshold >= 1.0), BJ=_tile_experts(bn, e), SBK=sbk, ONE=n_e <= sbk,
        RT=T if routed else 1, GATED=gated, HAS_BG=b_gate is not None, HAS_BU=b_up is not None,
        HAS_TAU=tau is not None,
        GATE_DIAL=dial, TWO_PHASE=bool(cfg["gu_two_phase"]), COUNT=counts is not None, COMPACT=compact,
        FUSED=fused, MT=max(2, triton.next_power_of_2(T)), HAS_IN=has_in, HAS_DEC=has_dec,
        CBLK=min(cfg["c_BLOCK"], max(16, triton.next_power_of_2(nb))),
        ACT=_ACTS[act], BT=_BT, BN=bn, BK=cfg["gu_dec_BK"] if has_dec else cfg["gu_BK"], num_warps=cfg["gu_warps"],
        num_stages=cfg["gu_stages"])
    y = torch.empty((T, d), device=x.device, dtype=x.dtype)
    bd = cfg[pre + "dn_BD"]
    dbn = cfg[pre + "dn_BN"]
    kch = max(cfg["dn_KCHUNK"], dbn)
    # compact: c_dn_split row chunks (the active rows split evenly on the device); old: chunks of dn_KCHUNK neurons
    nk = max(1, min(cfg["c_dn_split"], triton.cdiv(m, dbn))) if compact else triton.cdiv(m, kch)
    det = bool(cfg["dn_deterministic"])
    ws = torch.empty((nk, T, d), device=x.device, dtype=torch.float32) if det else acc
    _down_kernel[(nk, triton.cdiv(d, bd))](
        h, w_dt, b_down if b_down is not None else dummy, ws, cnt, y, blk, T, d, m, e,
        HAS_BD=b_down is not None, BT=_BT, BN=dbn, BD=bd, KCHUNK=kch,
        DET=det, NKP=triton.next_power_of_2(nk), CH=min(64, bd), COMPACT=compact,
        SKIP=bool(cfg["c_dn_skip"] or dial or tau is not None), num_warps=cfg[pre + "dn_warps"],
        num_stages=cfg[pre + "dn_stages"])
    return y


def _mask_act_impl(g, u, g_dec, u_dec, b_gate, b_up, mask, tau, gate_scale, gate_tau, counts, e, n_shared, act):
    T, m = u.shape
    n_e = mask.shape[1]
    h = torch.empty((T, m), device=u.device, dtype=u.dtype)
    mk = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    dummy = h
    block = 1024
    dial = g is not None and gate_scale is not None and gate_tau > 0
    has_dec = g_dec is not None or u_dec is not None
    _mask_act_kernel[(T, triton.cdiv(m, block))](
        g if g is not None else u, u, g_dec if g_dec is not None else dummy, u_dec if u_dec is not None else dummy,
        b_gate if b_gate is not None else dummy, b_up if b_up is not None else dummy,
        mk, tau if tau is not None else dummy, gate_scale if dial else dummy, float(gate_tau) if dial else 0.0,
        counts if counts is not None else dummy, h, T, m, e, n_shared, n_e,
        GATED=g is not None, HAS_BG=b_gate is not None, HAS_BU=b_up is not None, HAS_TAU=tau is not None,
        GATE_DIAL=dial, COUNT=counts is not None, HAS_DEC=has_dec, ACT=_ACTS[act], BLOCK=block, num_warps=4)
    return h


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (torch.compile / CUDA graphs)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("densesparse::route", mutates_args=())
def route_op(x: Tensor, r_w1: Tensor, r_b1: Optional[Tensor], r_w2: Tensor, r_b2: Optional[Tensor],
             threshold: float) -> Tensor:
    return _route_impl(x, r_w1, r_b1, r_w2, r_b2, threshold)


@route_op.register_fake
def _(x, r_w1, r_b1, r_w2, r_b2, threshold):
    return x.new_empty((x.shape[0], r_w2.shape[0]), dtype=torch.bool)


@torch.library.custom_op("densesparse::route_logits", mutates_args=())
def route_logits_op(x: Tensor, r_w1: Tensor, r_b1: Optional[Tensor], r_w2: Tensor, r_b2: Optional[Tensor]) -> Tensor:
    return _logits_impl(x, r_w1, r_b1, r_w2, r_b2)


@route_logits_op.register_fake
def _(x, r_w1, r_b1, r_w2, r_b2):
    return x.new_empty((x.shape[0], r_w2.shape[0]), dtype=torch.float32)


# acc / cnt are a per-layer workspace that every call leaves zeroed as it found it: declared non-mutated.
# Each op comes twice: without counts (what inference and torch.compile run; inductor fails to lower an op whose
# mutable argument is an optional None) and "_counted", which adds to counts ([2, T] int32: per token, up rows
# computed and neurons kept for down; the stats of `densesparse eval`).
@torch.library.custom_op("densesparse::sparse_mlp_decode", mutates_args=())
def sparse_mlp_decode_op(x: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_dt: Tensor, b_gate: Optional[Tensor],
                         b_up: Optional[Tensor], b_down: Optional[Tensor], mask: Tensor, tau: Optional[Tensor],
                         gate_scale: Optional[Tensor], gate_tau: float, acc: Tensor, cnt: Tensor, e: int,
                         n_shared: int, act: str, compact: bool, input_tau: float, decide_tau: float) -> Tensor:
    return _decode_impl(x, w_gate, w_up, w_dt, b_gate, b_up, b_down, mask, tau, gate_scale, gate_tau, None, acc,
                        cnt, e, n_shared, act, compact, input_tau, decide_tau)


@torch.library.custom_op("densesparse::sparse_mlp_decode_counted", mutates_args=("counts",))
def sparse_mlp_decode_counted_op(x: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_dt: Tensor,
                                 b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
                                 mask: Tensor, tau: Optional[Tensor], gate_scale: Optional[Tensor], gate_tau: float,
                                 counts: Tensor, acc: Tensor, cnt: Tensor, e: int, n_shared: int, act: str,
                                 compact: bool, input_tau: float, decide_tau: float) -> Tensor:
    return _decode_impl(x, w_gate, w_up, w_dt, b_gate, b_up, b_down, mask, tau, gate_scale, gate_tau, counts, acc,
                        cnt, e, n_shared, act, compact, input_tau, decide_tau)


@torch.library.custom_op("densesparse::sparse_mlp_decode_routed", mutates_args=())
def sparse_mlp_decode_routed_op(x: Tensor, w_gate: Optional[Tensor], w_up: Tensor, w_dt: Tensor,
                                b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
                                logits: Tensor, threshold: float, tau: Optional[Tensor], gate_scale: Optional[Tensor],
                                gate_tau: float, acc: Tensor, cnt: Tensor, e: int, n_shared: int, act: str,
                                input_tau: float, decide_tau: float) -> Tensor:
    return _decode_impl(x, w_gate, w_up, w_dt, b_gate, b_up, b_down, None, tau, gate_scale, gate_tau, None, acc,
                        cnt, e, n_shared, act, False, input_tau, decide_tau, logits=logits, threshold=threshold)


@torch.library.custom_op("densesparse::mask_act", mutates_args=())
def mask_act_op(g: Optional[Tensor], u: Tensor, g_dec: Optional[Tensor], u_dec: Optional[Tensor],
                b_gate: Optional[Tensor], b_up: Optional[Tensor], mask: Tensor, tau: Optional[Tensor],
                gate_scale: Optional[Tensor], gate_tau: float, e: int, n_shared: int, act: str) -> Tensor:
    return _mask_act_impl(g, u, g_dec, u_dec, b_gate, b_up, mask, tau, gate_scale, gate_tau, None, e, n_shared, act)


@torch.library.custom_op("densesparse::mask_act_counted", mutates_args=("counts",))
def mask_act_counted_op(g: Optional[Tensor], u: Tensor, g_dec: Optional[Tensor], u_dec: Optional[Tensor],
                        b_gate: Optional[Tensor], b_up: Optional[Tensor], mask: Tensor, tau: Optional[Tensor],
                        gate_scale: Optional[Tensor], gate_tau: float, counts: Tensor, e: int, n_shared: int,
                        act: str) -> Tensor:
    return _mask_act_impl(g, u, g_dec, u_dec, b_gate, b_up, mask, tau, gate_scale, gate_tau, counts, e, n_shared,
                          act)


@sparse_mlp_decode_op.register_fake
def _(x, *args):
    return x.new_empty(x.shape)


@sparse_mlp_decode_counted_op.register_fake
def _(x, *args):
    return x.new_empty(x.shape)


@sparse_mlp_decode_routed_op.register_fake
def _(x, *args):
    return x.new_empty(x.shape)


@mask_act_op.register_fake
def _(g, u, *args):
    return u.new_empty(u.shape)


@mask_act_counted_op.register_fake
def _(g, u, *args):
    return u.new_empty(u.shape)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def route(x: Tensor, r_w1: Tensor, r_b1: Optional[Tensor], r_w2: Tensor, r_b2: Optional[Tensor],
          threshold: float) -> Tensor:
    """Router MLP + softmax + XMoE threshold rule -> mask [T, n_e] bool, on device, no host sync."""
    return route_op(x, r_w1, r_b1, r_w2, r_b2, float(threshold))


def routed_select_ok(T: int, compact: Optional[bool], e: int, n_e: int, dial: bool) -> bool:
    """Whether route_logits + sparse_mlp(logits=) should replace route + sparse_mlp(mask) for a call of T tokens
    (this compact argument, expert size e, n_e routed experts, gate dial on or not): CONFIG["routed_select"], at
    most CONFIG["routed_max_t"] tokens on the non-compacted Triton decode path, and at most
    CONFIG["routed_max_cells"] pairwise comparisons per tile and token."""
    compact = CONFIG["compact"] if compact is None else compact
    bn = CONFIG["gd_BN"] if dial else CONFIG["gu_BN"]
    return (bool(CONFIG["routed_select"]) and T <= min(DECODE_MAX_T, _ROUTED_MAX_T, CONFIG["routed_max_t"])
            and not compact
            and _tile_experts(bn, e) * n_e <= CONFIG["routed_max_cells"])


def route_logits(x: Tensor, r_w1: Tensor, r_b1: Optional[Tensor], r_w2: Tensor, r_b2: Optional[Tensor]) -> Tensor:
    """Router MLP -> logits [T, n_e] fp32 (T <= 16), for sparse_mlp(logits=, threshold=): the selection is then
    decided inside the MLP's gate/up kernel, one launch fewer than route() + sparse_mlp(mask)."""
    return route_logits_op(x, r_w1, r_b1, r_w2, r_b2)


def pack(w_gate: Optional[Tensor], w_up: Tensor, w_down_t: Tensor, e: int, n_shared: int) -> dict:
    """References to the [m, d] row-major weights (no copy when they are contiguous) + the decode workspace.

    A non-contiguous weight is copied once (reported under 'copied'); callers that want one copy of each weight
    on the GPU pass contiguous tensors."""
    m, d = w_up.shape
    if m % e:
        raise ValueError(f"m={m} is not a multiple of the expert size e={e}")
    nb = m // e
    if n_shared * e > m:
        raise ValueError("more shared neurons than neurons")
    if w_down_t.shape != (m, d) or (w_gate is not None and w_gate.shape != (m, d)):
        raise ValueError("w_gate, w_up and w_down_t must all be [m, d]")
    copied = [name for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t))
              if w is not None and not w.is_contiguous()]
    dev = w_up.device
    return {
        "w_gate": w_gate if w_gate is None or w_gate.is_contiguous() else w_gate.contiguous(),
        "w_up": w_up.contiguous(), "w_down_t": w_down_t.contiguous(), "copied": copied,
        "e": int(e), "n_shared": int(n_shared), "m": m, "d": d, "n_e": nb - n_shared,
        # per-layer workspace for the decode down kernel; every call leaves it zeroed
        "acc": torch.zeros((_BT, d), device=dev, dtype=torch.float32),
        "cnt": torch.zeros((triton.cdiv(d, _CNT_MIN_BD) + 1,), device=dev, dtype=torch.int32),
    }


def sparse_mlp(x: Tensor, packed: dict, b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
               mask: Tensor, tau: Optional[Tensor], act: str, path: Optional[str] = None,
               gate_scale: Optional[Tensor] = None, gate_tau: float = 0.0, counts: Optional[Tensor] = None,
               compact: Optional[bool] = None, input_tau: float = 0.0, decide_tau: float = 0.0,
               logits: Optional[Tensor] = None, threshold: float = 1.0) -> Tensor:
    """y [T, d] = sum over computed neurons of h * w_down_t + b_down. path: None (auto by T), 'triton', 'dense'.

    compact (Triton path only): True / False = the compacted / old decode kernels for this call; None = CONFIG
    ["compact"] (read at the call; a CUDA graph keeps what was chosen at capture). SparseMLP passes True for
    one-token calls of layers calibrated to few experts (runtime.COMPACT_BELOW).

    Gate dial (gated FFNs, gate_tau > 0): a selected neuron is kept only where |act(gate)| * gate_scale [m] >=
    gate_tau; the Triton path then loads no up row that no token keeps. counts: an int32 [2, T] tensor the call
    adds to (up rows computed, neurons kept for down, per token), for the FLOPs stats. input_tau > 0: input skip,
    gate and up see x * (|x| >= input_tau) (compared in x's dtype, as torch compares; the Triton path cuts x as it
    loads it). decide_tau > input_tau: early decisions, the gate dial and tau judge each neuron on gate / up summed
    over the channels with |x| >= decide_tau only; the neurons they keep get the full sums (SparseMLP.deciding).

    mask None and logits [T, n_e] (route_logits) with threshold: the Triton path's gate/up tiles apply the XMoE
    rule themselves (the same rule as route()); the other paths, counts and compact need the mask."""
    if act not in _ACTS:
        raise ValueError(f"unsupported activation {act!r}")
    x = x.contiguous()
    T = x.shape[0]
    p = packed
    if path is None:
        path = "triton" if T <= DECODE_MAX_T else "dense"
    if compact is None:
        compact = bool(CONFIG["compact"])
    if mask is None:
        if logits is None or counts is not None or compact or T > _ROUTED_MAX_T or path != "triton":
            raise ValueError("sparse_mlp: pass mask; logits= (no mask) runs on the Triton decode path only, "
                             f"at most {_ROUTED_MAX_T} tokens, without counts or compact")
        return sparse_mlp_decode_routed_op(x, p["w_gate"], p["w_up"], p["w_down_t"], b_gate, b_up, b_down,
                                           logits.contiguous(), float(threshold), tau, gate_scale, float(gate_tau),
                                           p["acc"], p["cnt"], p["e"], p["n_shared"], act, float(input_tau),
                                           float(decide_tau))
    if mask.dtype != torch.bool:
        mask = mask.bool()
    mask = mask.contiguous()
    if path == "triton":
        if T > _BT:
            raise ValueError(f"triton decode path takes at most {_BT} tokens")
        head = (x, p["w_gate"], p["w_up"], p["w_down_t"], b_gate, b_up, b_down, mask, tau, gate_scale, float(gate_tau))
        tail = (p["acc"], p["cnt"], p["e"], p["n_shared"], act, bool(compact), float(input_tau), float(decide_tau))
        if counts is None:
            return sparse_mlp_decode_op(*head, *tail)
        return sparse_mlp_decode_counted_op(*head, counts, *tail)
    if input_tau > 0:
        x = x * (x.abs() >= input_tau)
    w_gate, w_up, w_dt = p["w_gate"], p["w_up"], p["w_down_t"]
    g = None if w_gate is None else x @ w_gate.t()
    u = x @ w_up.t()
    g_dec = u_dec = None
    if decide_tau > 0:
        x_dec = x * (x.abs() >= decide_tau)
        # the partial sums the dials judge (the gate dial: gate; the down skip: gate and up)
        g_dec = None if w_gate is None else x_dec @ w_gate.t()
        u_dec = None if tau is None else x_dec @ w_up.t()
    head = (g, u, g_dec, u_dec, b_gate, b_up, mask, tau, gate_scale, float(gate_tau))
    tail = (p["e"], p["n_shared"], act)
    h = mask_act_op(*head, *tail) if counts is None else mask_act_counted_op(*head, counts, *tail)
    if b_down is not None:
        return torch.addmm(b_down.to(x.dtype), h, w_dt)
    return h @ w_dt
