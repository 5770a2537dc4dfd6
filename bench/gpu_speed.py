"""GPU speed of the expert-sparse MLP layer (Triton decode kernels, dense-with-mask prefill) vs dense cuBLAS.

    python3 bench/gpu_speed.py --out $OUT/gpu-h100.json [--sweep] [--quick]
    python3 bench/gpu_speed.py --out RECORD.json --gate-dial-only   (adds/replaces the key gate_dial of RECORD.json)
    python3 bench/gpu_speed.py --out $OUT/gpu-h100-compact.json --compact-only [--quick] [--no-trials]
    python3 bench/gpu_speed.py --out RECORD.json --compact-crossover   (adds/replaces the key compact_crossover)
    python3 bench/gpu_speed.py --out $OUT/gpu-h100-e2e-compact.json --e2e-only [--compile 1] [--profile-layer]

Sections (each a function; main() strings them together, so a section can be added):
  check_correctness()  quick float64-reference checks, fails loudly
  copy_bandwidth()     device-to-device copy, the byte ceiling
  sweep_configs()      (--sweep) a few kernel tile configurations at llama3-8b, picks the fastest
  bench_router()       router + selection alone; at T <= 16 every router mode (kernels.CONFIG["router"])
  bench_crossover()    e=8 layer at T 1..16: dense vs both sparse paths; the measured dense_above_tokens
  bench_mlp()          decode layer: dense / sparse (what SparseMLP runs: router + selection + sparse MLP, or the
                       dense MLP above runtime.DENSE_ABOVE_TOKENS) / pre-sliced ideal / router
  bench_gate_dial()    llama3-8b e=8 decode layer with the gate dial (router ~50% experts + gate_tau dropping ~half
                       of the rest's up rows): dense / sparse without / with the dial (both gate/up tile variants),
                       and the MLP-FLOPs kept fraction from the kernels' own counts
  bench_prefill()      2048-token layer: dense vs sparse (dense dispatch; router + dense-with-mask also recorded)
  tile_trials()        a few decode-kernel tile configs at llama3-8b T=1 (MLP only); keeps the fastest
  compact_trials()     (--compact-only) tiles of the compacted decode path (kernels.CONFIG["compact"]), old path as
                       the yardstick; profile_compact() per-kernel device times old vs compacted; bench_compact() old vs
                       compacted side by side (router + MLP, MLP alone, list kernel, ideal, floor; e 8/16/32, T 1/2
                       and 4); bench_compact_dial() the same with the gate dial
  bench_compact_crossover() (--compact-crossover) T=1, old vs compacted path over expert fractions 0.2-0.5, with
                       and without the gate dial: where runtime.COMPACT_BELOW should sit
  bench_e2e()          Llama-3-8B-shaped model (random bf16 weights), decode tok/s (128-token prompt in a StaticCache,
                       one decode step captured in a CUDA graph)
                       and 2048-token prefill, dense vs sparse at ~50% / ~25% kept MLP FLOPs; --compile B,..:
                       the same decode step with the model torch.compile'd (decode_compiled)
  profile_layer()      (--profile-layer) per-kernel device times of a batch-1 layer (router + MLP) vs its graph time
  routed_trials()      (--routed-trials) the selection in the gate/up tiles vs the select kernel's mask, side by side
All times: CUDA-graph replays (each graph runs the op over several weight copies so L2 does not flatter),
CUDA events, median of repeated replays, per call in microseconds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from densesparse import kernels as K  # noqa: E402
from densesparse.runtime import COMPACT_BELOW, DENSE_ABOVE_TOKENS as DENSE_ABOVE  # noqa: E402
from mlp_shapes import SHAPES  # noqa: E402
from render import sweep_table  # noqa: E402

ROUTER_R = dict.fromkeys(SHAPES, 64)  # ConvertConfig.router_width
L2_BYTES = 50e6
DT = torch.bfloat16
DEV = "cuda"


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------
def time_graph(fn, n_inner, reps=25, warm=3):
    """fn(i) enqueues call i (i picks the weight copy). Captures n_inner calls in one graph; median per call, us."""
    return time_graphs([fn], n_inner, reps, warm)[0]


def time_graphs(fns, n_inner, reps=25, warm=3):
    """time_graph for several fns (one graph each), their graphs replayed in turn, the order reversed every other round
    (a b c, c b a, ...): clock drift under a sustained load (seen: the same 2048-token dense layer 5% slower a few
    seconds later, and 3% apart when always replayed in the same order) hits all alike."""
    graphs = []
    for fn in fns:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(2):
                fn(i % n_inner)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n_inner):
                fn(i)
        graphs.append(g)
    ts = [[t * 1000.0 / n_inner for t in run] for run in replay_in_turn(graphs, reps, warm)]
    del graphs
    return [statistics.median(t) for t in ts]


def replay_in_turn(graphs, reps, warm):
    """ms of every timed replay of each graph: the graphs replayed in turn, the order reversed every other round."""
    for _ in range(warm):
        for g in graphs:
            g.replay()
    torch.cuda.synchronize()
    ts = [[] for _ in graphs]
    for rep in range(reps):
        order = list(enumerate(graphs))
        for j, g in (order if rep % 2 == 0 else order[::-1]):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            ts[j].append(a.elapsed_time(b))
    return ts


# issue 4's grid for the MLP layer (--sweep); 8 is convert's default expert size
SWEEP_SHAPES = ("smollm2-135m", "llama2-7b", "llama3-8b")
SWEEP_E = (8, 16, 32, 64, 128)
SWEEP_KEPT = (0.75, 0.5, 0.35, 0.25)
SWEEP_T = (1, 4, 16)


def n_copies(bytes_one):
    return max(2, math.ceil(2.5 * L2_BYTES / bytes_one))


# ----------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------
def check_correctness():
    path = os.path.join(ROOT, "tests", "test_kernels_cuda.py")
    spec = importlib.util.spec_from_file_location("tkc", path)
    tk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tk)
    gen = torch.Generator().manual_seed(12345)
    worst = 0.0
    for e in (1, 8, 32, 128):
        for T in (1, 4, 16, 33):
            for dt in (torch.bfloat16, torch.float16):
                paths = ["triton", "dense"] if T <= 16 else ["dense"]
                for p in paths:
                    err = tk.run_case(gen, d=256, e=e, n_shared=1, n_e=max(6, 1024 // e), T=T, dtype=dt, path=p,
                                      biases=(e == 8), use_tau=(e == 1))
                    worst = max(worst, err)
                    assert err < 1e-2, ("mlp", e, T, dt, p, err)
    # full-size layer, llama3-8b, against float64
    for T in (1, 16):
        err = tk.run_case(gen, d=4096, e=32, n_shared=0, n_e=448, T=T, dtype=DT, path="triton")
        worst = max(worst, err)
        assert err < 1e-2, ("mlp-large", T, err)
    # router
    for (T, n_e, r) in ((1, 112, 256), (16, 1792, 256), (4, 14336, 256), (40, 448, 128)):
        d = 1024
        x = torch.randn(T, d, generator=gen).to(DEV, DT)
        w1 = (torch.randn(r, d, generator=gen) * d ** -0.5).to(DEV, DT)
        w2 = (torch.randn(n_e, r, generator=gen) * 2 * r ** -0.5).to(DEV, DT)
        b1 = (torch.randn(r, generator=gen) * 0.1).to(DEV, DT)
        for t in (0.3, 0.5, 0.9, 1.0):
            mk = K.route(x, w1, b1, w2, None, t)
            ref, p = tk.ref_route(x, w1, b1, w2, None, t)
            tk.check_route(mk, p, ref, t, 1e-4 if T <= 16 else 3e-2)
    print(f"correctness: OK (worst rel err {worst:.2e})", flush=True)
    return worst


def copy_bandwidth():
    n = 1 << 29  # 1 GiB of bf16... 2 bytes * 2^29 = 1 GiB
    a = torch.randn(n // 2, device=DEV, dtype=torch.float32).to(torch.bfloat16)
    a = torch.cat([a, a])
    b = torch.empty_like(a)
    us = time_graph(lambda i: b.copy_(a), 2, reps=10)
    gbps = 2 * a.numel() * 2 / (us * 1e-6) / 1e9
    del a, b
    torch.cuda.empty_cache()
    print(f"device copy: {gbps:.0f} GB/s (read+write)", flush=True)
    return gbps


class Layer:
    """Weight copies of one MLP shape, standard dense layout + packed layout for one expert size."""

    def __init__(self, shape, seed=0):
        self.name = shape
        self.d, self.m = SHAPES[shape]
        self.r = ROUTER_R[shape]
        d, m = self.d, self.m
        self.nc = n_copies(3 * m * d * 2)
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.dense = []
        for _ in range(self.nc):
            wg = torch.randn(m, d, device=DEV, dtype=DT, generator=g) * d ** -0.5
            wu = torch.randn(m, d, device=DEV, dtype=DT, generator=g) * d ** -0.5
            wd = torch.randn(d, m, device=DEV, dtype=DT, generator=g) * m ** -0.5
            self.dense.append((wg, wu, wd))
        self.packed = None
        self.e = None
        self.gen = g

    def pack_for(self, e):
        if self.e == e:
            return
        self.packed = None
        torch.cuda.empty_cache()
        if not hasattr(self, "wdt"):
            self.wdt = [wd.t().contiguous() for (_, _, wd) in self.dense]  # the layout the runtime re-lays to
        self.packed = [K.pack(wg, wu, wdt, e, 0) for (wg, wu, _), wdt in zip(self.dense, self.wdt)]
        n_e = self.m // e
        g = self.gen
        self.router = [((torch.randn(self.r, self.d, device=DEV, dtype=DT, generator=g) * self.d ** -0.5),
                        torch.randn(self.r, device=DEV, dtype=DT, generator=g) * 0.1,
                        torch.randn(n_e, self.r, device=DEV, dtype=DT, generator=g) * self.r ** -0.5,
                        torch.randn(n_e, device=DEV, dtype=DT, generator=g) * 0.1) for _ in range(self.nc)]
        self.e = e


def dense_mlp(x, wg, wu, wd):
    return torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t()) @ wd.t()


def random_mask(T, n_e, kept, gen):
    k = max(1, round(kept * n_e))
    order = torch.rand(T, n_e, generator=gen, device=DEV).argsort(dim=1)
    mask = torch.zeros(T, n_e, dtype=torch.bool, device=DEV)
    mask.scatter_(1, order[:, :k], True)
    return mask


def time_sparse(L, x, mask, path, with_router=True, thr=0.5, compact=None):
    def fn(i):
        if with_router:
            rw1, rb1, rw2, rb2 = L.router[i % L.nc]
            K.route(x, rw1, rb1, rw2, rb2, thr)
        return K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None, "silu", path=path, compact=compact)
    return time_graph(fn, 2 * L.nc)


def time_router(L, x, thr=0.5):
    def fn(i):
        rw1, rb1, rw2, rb2 = L.router[i % L.nc]
        return K.route(x, rw1, rb1, rw2, rb2, thr)
    return time_graph(fn, 2 * L.nc)


def time_dense(L, x):
    return time_graph(lambda i: dense_mlp(x, *L.dense[i % L.nc]), 2 * L.nc)


def time_ideal(L, x, kept):
    mk = max(1, round(kept * L.m))
    sl = [(wg[:mk].contiguous(), wu[:mk].contiguous(), wd[:, :mk].contiguous()) for (wg, wu, wd) in L.dense]
    us = time_graph(lambda i: dense_mlp(x, *sl[i % L.nc]), 2 * L.nc)
    del sl
    return us


def sweep_configs(L):
    """One-at-a-time sweep of the decode kernel tiles at llama3-8b, e=32; keeps the best of each knob."""
    L.pack_for(32)
    gen = torch.Generator(device=DEV).manual_seed(7)
    cases = []
    for T in (1, 16):
        x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
        for kept in (0.5, 0.25):
            cases.append((x, random_mask(T, L.m // 32, kept, gen)))
    knobs = [
        ("gu_BK", [128, 256, 512]), ("gu_BN", [16, 32, 64]), ("gu_stages", [2, 3, 4, 5]), ("gu_warps", [2, 4, 8]),
        ("dn_BD", [128, 256, 512]), ("dn_KCHUNK", [128, 256, 512, 1024]), ("dn_BN", [16, 32, 64]),
        ("dn_stages", [2, 3, 4]), ("dn_warps", [2, 4, 8]),
    ]
    log = []
    for key, vals in knobs:
        best = None
        for v in vals:
            old = K.CONFIG[key]
            K.CONFIG[key] = v
            try:
                ts = [time_sparse(L, x, mk, "triton", with_router=False) for (x, mk) in cases]
                tot = sum(ts)
            except Exception as ex:  # a tile that does not compile/fit
                ts, tot = str(ex)[:80], float("inf")
            K.CONFIG[key] = old
            log.append({"knob": key, "value": v, "us": ts})
            print(f"  sweep {key}={v}: {ts}", flush=True)
            if best is None or tot < best[1]:
                best = (v, tot)
        K.CONFIG[key] = best[0]
    print("sweep picked:", {k: K.CONFIG[k] for k, _ in knobs}, flush=True)
    return {"picked": dict(K.CONFIG), "log": log}


def bench_mlp(shapes, expert_sizes, kepts, batches, copy_gbps):
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(1)
    for shape in shapes:
        L = Layer(shape)
        dense_cache, ideal_cache = {}, {}
        xs = {T: torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen) for T in batches}
        dispatch_cache = {}
        for T in batches:
            if T > DENSE_ABOVE:  # SparseMLP runs the dense MLP: timed as its own graph, interleaved with dense
                dense_cache[T], dispatch_cache[T] = time_graphs(
                    [lambda i, x=xs[T]: dense_mlp(x, *L.dense[i % L.nc])] * 2, 2 * L.nc)
            else:
                dense_cache[T] = time_dense(L, xs[T])
            for kept in kepts:
                ideal_cache[(T, kept)] = time_ideal(L, xs[T], kept)
        for e in expert_sizes:
            L.pack_for(e)
            n_e = L.m // e
            for T in batches:
                x = xs[T]
                router_us = time_router(L, x)
                for kept in kepts:
                    decode = T <= K.DECODE_MAX_T
                    # decode calls: each copy's router threshold bisected to `kept` (the routed selection needs
                    # the router's own decisions); larger calls: a random mask of `kept`, the router timed too
                    thrs = copy_thresholds(L, x, kept) if decode else None
                    mask = K.route(x, *L.router[0], thrs[0]) if decode else random_mask(T, n_e, kept, gen)
                    union = mask.any(0).float().mean().item()
                    # SparseMLP's rule (runtime.COMPACT_BELOW): a one-token call of a layer whose measured expert
                    # fraction (here the mask's: union at T=1) is <= COMPACT_BELOW takes the compacted kernels
                    compact = T == 1 and union <= COMPACT_BELOW
                    if decode:  # what SparseMLP runs (layer_step), and the non-compacted path where it compacts
                        tri = time_graph(lambda i: layer_step(L, x, thrs, compact, i), 2 * L.nc)
                        tri_old = time_graph(lambda i: layer_step(L, x, thrs, False, i), 2 * L.nc) if compact else None
                    else:
                        tri = time_sparse(L, x, mask, "triton") if T <= 16 else None
                        tri_old = None
                    dm = time_sparse(L, x, mask, "dense")
                    if T > DENSE_ABOVE:
                        auto, how = dispatch_cache[T], "dense-dispatch"
                    else:  # what path=None takes (chosen by T)
                        auto, how = (tri, "triton") if T <= K.DECODE_MAX_T else (dm, "dense-masked")
                    bytes_moved = (union * 3 * L.m * L.d * 2 + (L.r * L.d + n_e * L.r) * 2 if how != "dense-dispatch"
                                   else 3 * L.m * L.d * 2)
                    rows.append({
                        "shape": shape, "expert_size": e, "kept": kept, "batch": T,
                        "dense_us": round(dense_cache[T], 2), "sparse_us": round(auto, 2),
                        "ideal_us": round(ideal_cache[(T, kept)], 2), "router_us": round(router_us, 2),
                        "gbps": round(bytes_moved / (auto * 1e-6) / 1e9, 1),
                        "path": how, "router_in_sparse": how != "dense-dispatch",
                        "compact": how == "triton" and compact,
                        "triton_old_us": None if tri_old is None else round(tri_old, 2),
                        "triton_us": None if tri is None else round(tri, 2), "dense_masked_us": round(dm, 2),
                        "union_frac": round(union, 4),
                        "floor_us": round(bytes_moved / (copy_gbps * 1e9) * 1e6, 2),
                    })
                    r = rows[-1]
                    print(f"{shape:13s} e={e:<3d} kept={kept:<4} T={T:<2d} dense {r['dense_us']:7.1f} "
                          f"sparse {r['sparse_us']:7.1f} (tri {r['triton_us']}, compact {r['compact']}, old "
                          f"{r['triton_old_us']}, dm {r['dense_masked_us']}) "
                          f"ideal {r['ideal_us']:7.1f} router {router_us:5.1f} floor {r['floor_us']:6.1f} "
                          f"x{r['dense_us'] / r['sparse_us']:.2f}", flush=True)
        del L
        torch.cuda.empty_cache()
    return rows


CROSSOVER_MARGIN = 1.02  # a layer timing's run-to-run spread on the H100 (runs A-C: T=3 kept 0.5 at 0.98/0.99/1.01)


def bench_crossover(Ts=(1, 2, 3, 4, 8, 16), kepts=(0.5, 0.25), e=8, shape="llama3-8b"):
    """Where sparsity stops paying: llama3-8b layer, expert size e, random masks (independent tokens: the union of
    their experts is the largest it gets). Per (kept, T): dense cuBLAS, router + Triton decode kernels, router +
    dense-with-mask. dense_above_tokens = the largest T up to which the faster sparse path beats dense by more than
    the timing spread (CROSSOVER_MARGIN) at every kept and every smaller T; a tie goes to dense, which never loses
    (runtime.DENSE_ABOVE_TOKENS cites this)."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(4)
    rows = []
    for T in Ts:
        x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
        dense = time_dense(L, x)
        for kept in kepts:
            mask = random_mask(T, L.m // e, kept, gen)
            tri = time_sparse(L, x, mask, "triton")
            dm = time_sparse(L, x, mask, "dense")
            rows.append({"kept": kept, "batch": T, "dense_us": round(dense, 2), "triton_us": round(tri, 2),
                         "dense_masked_us": round(dm, 2), "union_frac": round(mask.any(0).float().mean().item(), 4),
                         "best_speedup": round(dense / min(tri, dm), 3)})
            print(f"crossover e={e} kept={kept} T={T}: dense {dense:.1f} triton {tri:.1f} dense-masked {dm:.1f} "
                  f"union {rows[-1]['union_frac']:.2f} x{rows[-1]['best_speedup']:.2f}", flush=True)
    wins_up_to = 0
    for T in Ts:
        if all(r["best_speedup"] >= CROSSOVER_MARGIN for r in rows if r["batch"] == T):
            wins_up_to = T
        else:
            break
    triton_up_to = max([T for T in Ts if all(r["triton_us"] <= r["dense_masked_us"] for r in rows
                                             if r["batch"] == T)], default=0)
    del L
    torch.cuda.empty_cache()
    print(f"crossover: sparse beats dense by >= {CROSSOVER_MARGIN}x up to T={wins_up_to} (every kept); Triton path "
          f"beats dense-with-mask up to T={triton_up_to}", flush=True)
    return {"shape": shape, "expert_size": e, "router": K.CONFIG["router"], "rows": rows, "margin": CROSSOVER_MARGIN,
            "dense_above_tokens": wins_up_to, "triton_beats_dense_masked_up_to": triton_up_to}


def bench_down_det(Ts=(1, 2), kepts=(0.5, 0.25), e=8, shape="llama3-8b"):
    """Router + Triton decode path with the down kernel's fp32 atomics vs its fixed-order (deterministic)
    partial sums (CONFIG['dn_deterministic']), graphs interleaved."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(5)
    rows = []
    old = K.CONFIG["dn_deterministic"]
    try:
        for T in Ts:
            x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
            for kept in kepts:
                mask = random_mask(T, L.m // e, kept, gen)

                def fn(i, det):
                    K.CONFIG["dn_deterministic"] = det
                    rw1, rb1, rw2, rb2 = L.router[i % L.nc]
                    K.route(x, rw1, rb1, rw2, rb2, 0.5)
                    return K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None, "silu", path="triton")
                at, dt = time_graphs([lambda i: fn(i, False), lambda i: fn(i, True)], 2 * L.nc)
                rows.append({"kept": kept, "batch": T, "atomic_us": round(at, 2), "deterministic_us": round(dt, 2)})
                print(f"down det e={e} kept={kept} T={T}: atomics {at:.1f} us, fixed-order {dt:.1f} us", flush=True)
    finally:
        K.CONFIG["dn_deterministic"] = old
    del L
    torch.cuda.empty_cache()
    return rows


def _gate_layer(shape, e):
    """Layer packed for e; per weight copy gate_scale = mean |up| over 256 random inputs x down-row norm."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(8)
    xc = torch.randn(256, L.d, device=DEV, dtype=DT, generator=gen)
    gss = [((xc @ wu.t()).float().abs().mean(0) * wd.float().norm(dim=0)).to(DT) for (_, wu, wd) in L.dense]
    return L, gen, gss


def bisect_threshold(frac_at, frac, steps=16):
    """The least router mass threshold t (to 2^-steps) with frac_at(t) >= frac (frac_at: the fraction of experts
    a router selects at threshold t, non-decreasing in t)."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if frac_at(mid) < frac:
            lo = mid
        else:
            hi = mid
    return hi


def copy_frac(L, c, x):
    """frac_at for weight copy c's router on x."""
    return lambda t: K.route(x, *L.router[c], t).float().mean().item()


def _gate_case(L, gen, gss, T, e, expert_target, gate_drop):
    """Input x, router threshold bisected to keep ~expert_target of the experts (copy 0's router), each copy's
    router mask, gate_tau = the gate_drop quantile of |silu(gate)| * gate_scale over copy 0's selected neurons."""
    x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
    hi = bisect_threshold(copy_frac(L, 0, x), expert_target, steps=14)
    masks = [K.route(x, *L.router[i], hi) for i in range(L.nc)]
    score = torch.nn.functional.silu(x @ L.dense[0][0].t()).float().abs() * gss[0].float()
    gate_tau = torch.quantile(score[masks[0].repeat_interleave(e, dim=1)], gate_drop).item()
    return x, hi, masks, gate_tau


def gate_dial_tiles(Ts=(1, 2), e=8, shape="llama3-8b"):
    """MLP alone (router masks precomputed), llama3-8b e=8, the gate-dial case of bench_gate_dial: a few tile
    configs, each timed without the dial and with it (two-phase, fused), graphs interleaved. Diagnostics: the
    record keeps the log, K.CONFIG is restored."""
    L, gen, gss = _gate_layer(shape, e)
    base = dict(K.CONFIG)
    # run G2 tried gu_stages 4, gu_BK 512, gu_BN 16/64, gu_warps 8, dn_BN 64, dn_stages 4, dn_KCHUNK 256 (log in
    # bench/GPU_NOTES.md): only a 64-row tile for the dial paid, hence gd_BN
    trials = [{}, {"gd_BN": 32}, {"gd_BN": 128}, {"gd_BN": 128, "gu_warps": 8}]
    log = []
    for T in Ts:
        x, _, masks, gate_tau = _gate_case(L, gen, gss, T, e, 0.5, 0.5)

        def mlp(i, cfg, dial, two_phase=True):
            K.CONFIG.clear()
            K.CONFIG.update(base)
            K.CONFIG.update(cfg)
            K.CONFIG["gu_two_phase"] = two_phase
            c = i % L.nc
            return K.sparse_mlp(x, L.packed[c], None, None, None, masks[c], None, "silu", path="triton",
                                gate_scale=gss[c] if dial else None, gate_tau=gate_tau if dial else 0.0)
        for tr in trials:
            try:
                ts = [round(v, 2) for v in time_graphs([lambda i: mlp(i, tr, False), lambda i: mlp(i, tr, True, True),
                                                        lambda i: mlp(i, tr, True, False)], 2 * L.nc, reps=30)]
            except Exception as ex:  # a tile that does not compile / fit
                ts = str(ex)[:80]
            log.append({"batch": T, "cfg": tr, "us_nodial_twophase_fused": ts})
            print(f"  gate tiles T={T} {tr}: no dial / two-phase / fused {ts}", flush=True)
    K.CONFIG.clear()
    K.CONFIG.update(base)
    del L
    torch.cuda.empty_cache()
    return log


def bench_gate_dial(copy_gbps=None, Ts=(1, 2), e=8, shape="llama3-8b", expert_target=0.5, gate_drop=0.5):
    """The gate dial at llama3-8b, expert size e. Router threshold bisected so the router keeps ~expert_target of
    the experts on this input; gate_scale per weight copy = mean |up| over 256 random inputs x down-row norm (as
    SparseMLP.calibrate_gate_scale); gate_tau = the gate_drop quantile of |silu(gate)| * gate_scale over the
    selected neurons (copy 0). Graphs interleaved: dense; router + sparse MLP without the dial; with the dial,
    two-phase and fused gate/up tiles; the three MLPs alone on the router's masks. kept_flops_frac = (router +
    gate rows x d + up rows x d + down neurons x d) / (3 m d) per token, the rows from the kernels' counts (what
    SparseMLP's stats record), averaged over the weight copies."""
    L, gen, gss = _gate_layer(shape, e)
    d, m, r = L.d, L.m, L.r
    n_e = m // e
    rows = []
    old = K.CONFIG["gu_two_phase"]
    try:
        for T in Ts:
            x, thr, masks, gate_tau = _gate_case(L, gen, gss, T, e, expert_target, gate_drop)

            def mlp(i, dial, two_phase=True, mask=None, counts=None):
                K.CONFIG["gu_two_phase"] = two_phase
                c = i % L.nc
                if mask is None:
                    mask = K.route(x, *L.router[c], thr)
                return K.sparse_mlp(x, L.packed[c], None, None, None, mask, None, "silu", path="triton",
                                    gate_scale=gss[c] if dial else None, gate_tau=gate_tau if dial else 0.0,
                                    counts=counts)
            # correctness on every copy: against float32 torch on the same mask, gate cut and weights
            worst = 0.0
            fr = {"nodial": [], "dial": []}
            for c in range(L.nc):
                wg, wu, wd = L.dense[c]
                g = torch.nn.functional.silu(x.float() @ wg.float().t())
                keep = masks[c].repeat_interleave(e, dim=1) & (g.abs() * gss[c].float() >= gate_tau)
                ref = ((g * (x.float() @ wu.float().t())) * keep) @ wd.float().t()
                for key, dial in (("nodial", False), ("dial", True)):
                    for tp in ((True, False) if dial else (True,)):
                        cnt = torch.zeros(2, T, dtype=torch.int32, device=DEV)
                        y = mlp(c, dial, tp, masks[c], cnt)
                        if dial:
                            err = ((y.float() - ref).norm() / ref.norm()).item()
                            worst = max(worst, err)
                            assert err < 1e-2, ("gate dial vs torch", T, c, tp, err)
                            assert (cnt[0] - keep.sum(1)).abs().max().item() <= 0.001 * m, (cnt, keep.sum(1))
                        if tp:
                            n_sel = masks[c].sum(1).float()
                            macs = (r * d + n_e * r) + n_sel * e * d + cnt[0].float() * d + cnt[1].float() * d
                            fr[key].append({"experts": n_sel.mean().item() / n_e,
                                            "up_of_selected": (cnt[0].float() / (n_sel * e)).mean().item(),
                                            "flops": (macs / (3 * m * d)).mean().item()})
            tms = time_graphs([
                lambda i: dense_mlp(x, *L.dense[i % L.nc]),
                lambda i: mlp(i, False),
                lambda i: mlp(i, True, True),
                lambda i: mlp(i, True, False),
                lambda i: mlp(i, False, True, masks[i % L.nc]),
                lambda i: mlp(i, True, True, masks[i % L.nc]),
                lambda i: mlp(i, True, False, masks[i % L.nc]),
            ], 2 * L.nc, reps=40)
            dense, nodial, two, fused, m_nodial, m_two, m_fused = tms

            def avg(key, f):
                return sum(v[f] for v in fr[key]) / len(fr[key])
            default = two if old else fused  # what SparseMLP runs: the CONFIG default
            union = sum(mk.any(0).float().mean().item() for mk in masks) / L.nc
            up_frac = avg("dial", "up_of_selected")
            # bytes of the default path: gate rows of the experts' union, the kept up rows (union over tokens at
            # T=2, approximated by the mean at T=1), the down rows of the kept neurons, the router
            byts = (union * (1 + up_frac + up_frac) * m * d + r * d + n_e * r) * 2
            row = {"shape": shape, "expert_size": e, "batch": T, "router_threshold": round(thr, 4),
                   "gate_tau": gate_tau, "gate_drop_target": gate_drop,
                   "experts_kept": round(avg("dial", "experts"), 4), "union_frac": round(union, 4),
                   "up_rows_kept_of_selected": round(up_frac, 4),
                   "kept_flops_frac": round(avg("dial", "flops"), 4),
                   "kept_flops_frac_nodial": round(avg("nodial", "flops"), 4),
                   "dense_us": round(dense, 2), "sparse_us": round(default, 2),
                   "sparse_nodial_us": round(nodial, 2), "sparse_two_phase_us": round(two, 2),
                   "sparse_fused_us": round(fused, 2), "mlp_nodial_us": round(m_nodial, 2),
                   "mlp_two_phase_us": round(m_two, 2), "mlp_fused_us": round(m_fused, 2),
                   "speedup_vs_dense": round(dense / default, 3),
                   "speedup_vs_nodial": round(nodial / default, 3),
                   "default_tile": "two_phase" if old else "fused",
                   "max_rel_err_vs_torch": round(worst, 5)}
            if copy_gbps:
                row["floor_mlp_us"] = round(byts / (copy_gbps * 1e9) * 1e6, 2)
            rows.append(row)
            print(f"gate dial e={e} T={T}: experts {row['experts_kept']:.3f} up kept {up_frac:.3f} of selected, "
                  f"flops {row['kept_flops_frac']:.3f} (no dial {row['kept_flops_frac_nodial']:.3f}); dense "
                  f"{dense:.1f} no-dial {nodial:.1f} two-phase {two:.1f} fused {fused:.1f} us; MLP alone no-dial "
                  f"{m_nodial:.1f} two-phase {m_two:.1f} fused {m_fused:.1f}; err {worst:.1e}", flush=True)
    finally:
        K.CONFIG["gu_two_phase"] = old
    del L
    torch.cuda.empty_cache()
    return rows


def bench_prefill(shapes, kepts, tokens=2048, e=8):
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(2)
    for shape in shapes:
        L = Layer(shape)
        L.pack_for(e)
        x = torch.randn(tokens, L.d, device=DEV, dtype=DT, generator=gen)
        router = time_graph(lambda i: K.route(x, *L.router[i % L.nc], 0.5), L.nc, reps=10)
        for kept in kepts:
            mask = random_mask(tokens, L.m // e, kept, gen)
            mlp_only = time_graph(lambda i: K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None,
                                                         "silu"), L.nc, reps=10)

            def fn(i):
                rw1, rb1, rw2, rb2 = L.router[i % L.nc]
                K.route(x, rw1, rb1, rw2, rb2, 0.5)
                return K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None, "silu")
            # dense, what SparseMLP does at this T (the dense MLP above DENSE_ABOVE_TOKENS, as its own graph) and
            # router + dense-with-mask, interleaved
            dn = lambda i: dense_mlp(x, *L.dense[i % L.nc])  # noqa: E731
            dense, disp, masked = time_graphs([dn, dn, fn], L.nc, reps=20)
            sp = disp if tokens > DENSE_ABOVE else masked
            rows.append({"shape": shape, "kept": kept, "tokens": tokens, "expert_size": e,
                         "dense_us": round(dense, 1), "sparse_us": round(sp, 1), "router_us": round(router, 1),
                         "path": "dense-dispatch" if tokens > DENSE_ABOVE else "dense-masked",
                         "router_masked_mlp_us": round(masked, 1), "masked_mlp_us": round(mlp_only, 1)})
            print(f"prefill {shape} kept={kept} T={tokens}: dense {dense:.1f} sparse {sp:.1f} ({rows[-1]['path']}) "
                  f"ratio {dense / sp:.3f} (router + masked mlp {masked:.1f}: x{dense / masked:.3f}; router "
                  f"{router:.1f}, masked mlp {mlp_only:.1f})", flush=True)
        del L
        torch.cuda.empty_cache()
    return rows


def profile_kernels():
    """Per-kernel device times (torch.profiler) of router + sparse MLP, llama3-8b e=32 T=1 kept 0.25, and the
    2048-token router; plus a small combined tile sweep at kept 0.25 / 0.5. Diagnostics for the notes."""
    from torch.profiler import ProfilerActivity, profile
    L = Layer("llama3-8b")
    L.pack_for(32)
    gen = torch.Generator(device=DEV).manual_seed(9)
    out = {}
    for T, kept in ((1, 0.25), (2048, 0.5)):
        x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
        mask = random_mask(T, L.m // 32, kept, gen)
        for _ in range(3):
            K.route(x, *L.router[0], 0.5)
            K.sparse_mlp(x, L.packed[0], None, None, None, mask, None, "silu")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(10):
                K.route(x, *L.router[i % L.nc], 0.5)
                K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None, "silu")
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            if ev.device_type is not None and getattr(ev, "device_time_total", 0) > 0:
                rows.append((ev.key[:60], round(ev.device_time_total / max(ev.count, 1), 2), ev.count))
        rows.sort(key=lambda r: -r[1])
        out[f"T{T}"] = rows
        print(f"profile T={T} kept={kept} (us per call):", flush=True)
        for r in rows[:12]:
            print("   ", r, flush=True)
    x = torch.randn(1, L.d, device=DEV, dtype=DT, generator=gen)
    cases = [(x, random_mask(1, L.m // 32, k, gen)) for k in (0.25, 0.5)]
    base = dict(K.CONFIG)
    trials = [{}, {"gu_BK": 128, "gu_stages": 3}, {"gu_BK": 128, "gu_stages": 4}, {"gu_BK": 256, "gu_stages": 2},
              {"gu_BK": 256, "gu_stages": 3}, {"gu_BK": 256, "gu_stages": 3, "gu_BN": 32},
              {"gu_BK": 128, "gu_stages": 3, "gu_BN": 32}, {"dn_warps": 2}, {"dn_KCHUNK": 256, "dn_BD": 256}]
    out["tiles"] = []
    for tr in trials:
        K.CONFIG.update(tr)
        try:
            ts = [round(time_sparse(L, xx, mk, "triton", with_router=False), 1) for (xx, mk) in cases]
        except Exception as ex:
            ts = str(ex)[:60]
        K.CONFIG.clear()
        K.CONFIG.update(base)
        out["tiles"].append({"cfg": tr, "us_kept_0.25_0.5": ts})
        print(f"  tiles {tr}: {ts}", flush=True)
    return out


def select_trials(e=8, shape="llama3-8b", kept=0.5,
                  tiles=((16, 512, 4), (64, 128, 4), (32, 256, 4), (16, 2048, 8), (8, 2048, 8), (8, 2048, 4),
                         (4, 2048, 4))):
    """The router at T=1 (three launches) with the select kernel's tiles (sel_BJ, sel_BK, sel_warps) varied (the
    first row is the default, (64, 128, 4) the one before run P2); each variant's masks checked against the
    default's on 32 random inputs. Router weights stay L2-resident here (only router graphs run): the times are
    the kernels' floor, not what a layer pays (profile_layer)."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(19)
    x = torch.randn(1, L.d, device=DEV, dtype=DT, generator=gen)
    thr = bisect_threshold(copy_frac(L, 0, x), kept, steps=14)
    xs = [torch.randn(1, L.d, device=DEV, dtype=DT, generator=gen) for _ in range(32)]
    cfgs = [{"sel_BJ": bj, "sel_BK": bk, "sel_warps": w} for bj, bk, w in tiles]
    ref = [K.route(xx, *L.router[0], thr) for xx in xs]
    rows = []
    for c in cfgs:
        masks = [_with_cfg(c, lambda xx=xx: K.route(xx, *L.router[0], thr)) for xx in xs]
        rows.append({**c, "mask_mismatches": sum(int((a != b).sum()) for a, b in zip(masks, ref))})
    fns = [lambda i, c=c: _with_cfg(c, lambda: K.route(x, *L.router[i % L.nc], thr)) for c in cfgs]
    for r, us in zip(rows, time_graphs(fns, 2 * L.nc)):
        r["router_us"] = round(us, 2)
        print(f"select_trials {r}", flush=True)
    del L
    torch.cuda.empty_cache()
    return {"shape": shape, "expert_size": e, "batch": 1, "target": kept, "rows": rows}


def layer_step(L, x, thr, compact, i, mlp=True, routed=None):
    """What SparseMLP runs for a decode call on weight copy i (thr: a float, or one per copy): where
    kernels.routed_select_ok allows it (routed None) or routed=True, the router's logits and the Triton MLP whose
    gate/up tiles select; else (routed=False) the router with its select kernel, then the MLP on that mask.
    mlp=False: the router part alone."""
    c = i % L.nc
    t = thr[c] if isinstance(thr, (list, tuple)) else thr
    if routed is None:
        routed = K.routed_select_ok(x.shape[0], compact, L.e, L.m // L.e, False)
    if routed:
        lg = K.route_logits(x, *L.router[c])
        if not mlp:
            return lg
        return K.sparse_mlp(x, L.packed[c], None, None, None, None, None, "silu", path="triton", compact=False,
                            logits=lg, threshold=t)
    mk = K.route(x, *L.router[c], t)
    if mlp:
        return K.sparse_mlp(x, L.packed[c], None, None, None, mk, None, "silu", path="triton", compact=compact)
    return mk


def copy_thresholds(L, x, kept, steps=14):
    """Per weight copy: the router threshold at which it selects `kept` of the experts on x (bisected)."""
    return [bisect_threshold(copy_frac(L, c, x), kept, steps=steps) for c in range(L.nc)]


def routed_trials(es=(8, 32), kepts=(0.5, 0.25), Ts=(1, 2), shape="llama3-8b"):
    """The selection in the gate/up tiles (route_logits + sparse_mlp(logits=)) against route() + sparse_mlp(mask),
    side by side in interleaved graphs: a decode layer (router + MLP) with every copy's router threshold bisected
    to `kept` of the experts; at T=1 also the compacted path (route() + compacted kernels: what SparseMLP takes for
    layers calibrated to <= COMPACT_BELOW of the experts), dense, the pre-sliced ideal, and each router part
    alone. Outputs of the two selections compared on every copy (equal: bit for bit). Per-kernel device times of
    both calls at T=1 (kernels_us, kernels_mask_us)."""
    L = Layer(shape)
    gen = torch.Generator(device=DEV).manual_seed(23)
    rows = []
    for e in es:
        L.pack_for(e)
        for T in Ts:
            x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
            for kept in kepts:
                thrs = copy_thresholds(L, x, kept)
                variants = {
                    "routed": lambda i: layer_step(L, x, thrs, False, i, routed=True),
                    "mask": lambda i: layer_step(L, x, thrs, False, i, routed=False),
                    "logits_only": lambda i: layer_step(L, x, thrs, False, i, mlp=False, routed=True),
                    "route_only": lambda i: layer_step(L, x, thrs, False, i, mlp=False, routed=False),
                    "dense": lambda i: dense_mlp(x, *L.dense[i % L.nc]),
                }
                if T == 1:
                    variants["compact"] = lambda i: layer_step(L, x, thrs, True, i, routed=False)
                us = dict(zip(variants, time_graphs(list(variants.values()), 2 * L.nc)))
                same = [torch.equal(layer_step(L, x, thrs, False, c, routed=True),
                                    layer_step(L, x, thrs, False, c, routed=False)) for c in range(L.nc)]
                row = {"shape": shape, "expert_size": e, "batch": T, "target": kept,
                       "experts_kept": round(sum(copy_frac(L, c, x)(thrs[c]) for c in range(L.nc)) / L.nc, 4),
                       "ideal_us": round(time_ideal(L, x, kept), 2),
                       **{f"{k}_us": round(v, 2) for k, v in us.items()},
                       "outputs_equal": sum(same), "copies": L.nc}
                if T == 1 and kept == kepts[0]:
                    row["kernels_us"] = kernel_times(lambda i: layer_step(L, x, thrs, False, i, routed=True))
                    row["kernels_mask_us"] = kernel_times(lambda i: layer_step(L, x, thrs, False, i, routed=False))
                rows.append(row)
                print(f"routed_trials {row}", flush=True)
    del L
    torch.cuda.empty_cache()
    return rows


def profile_layer(cases=((0.5, False), (0.25, True)), e=8, shape="llama3-8b", n=20):
    """Where a batch-1 layer's time goes: per-kernel device time (torch.profiler, us per call) of the router and the
    MLP kernels SparseMLP runs (random routers bisected to the kept fraction; compacted where the runtime rule
    would take it), next to the whole call's time in a CUDA graph. graph - sum(kernels) = what the launches and
    the gaps between them cost."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(17)
    x = torch.randn(1, L.d, device=DEV, dtype=DT, generator=gen)
    out = []
    for kept, compact in cases:
        thr = bisect_threshold(copy_frac(L, 0, x), kept, steps=14)

        def call(i, mlp=True):
            return layer_step(L, x, thr, compact, i, mlp=mlp)
        ks = kernel_times(call, n)
        graph_us, router_us, dense_us, relaid_us = time_graphs(
            [call, lambda i: call(i, mlp=False), lambda i: dense_mlp(x, *L.dense[i % L.nc]),
             lambda i: dense_mlp(x, *L.dense[i % L.nc][:2], L.wdt[i % L.nc].t())], 2 * L.nc)
        row = {"shape": shape, "expert_size": e, "batch": 1, "target": kept, "compact": compact,
               "experts_kept": round(copy_frac(L, 0, x)(thr), 4),
               "kernels_us": ks, "kernels_sum_us": round(sum(ks.values()), 2), "graph_us": round(graph_us, 2),
               "router_graph_us": round(router_us, 2), "dense_us": round(dense_us, 2),
               # the dense MLP on the layout SparseMLP re-lays down_proj to on its first CUDA call (a transposed
               # view of a [m, d] tensor): what the end-to-end dense rows run
               "dense_relaid_us": round(relaid_us, 2),
               "gaps_us": round(graph_us - sum(ks.values()), 2)}
        out.append(row)
        print(f"profile_layer kept={kept}: {row}", flush=True)
    del L
    torch.cuda.empty_cache()
    return out


def down_trials(e=8, shape="llama3-8b",
                cases=((0.5, False, ({}, {"dn_KCHUNK": 448}, {"dn_KCHUNK": 384}, {"dn_KCHUNK": 448, "dn_warps": 4})),
                       (0.25, True, ({}, {"c_dn_split": 33}, {"c_dn_split": 33, "c_dn_warps": 2})))):
    """A batch-1 layer (router + MLP, as profile_layer calls it) with the down kernel's grid varied, every config
    timed in turn in one time_graphs call. Wave balance on 132 SMs: dn_KCHUNK 512 gives 28 x 16 = 448 programs (3.4
    per SM), 448 gives 32 x 16 = 512 (3.9); the compacted path's c_dn_split 28 gives 448, 33 gives 528 (4.0).
    Outputs checked against the default config's (max relative difference)."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(23)
    x = torch.randn(1, L.d, device=DEV, dtype=DT, generator=gen)
    out = []
    for kept, compact, cfgs in cases:
        thr = bisect_threshold(copy_frac(L, 0, x), kept, steps=14)

        def call(i, cfg):
            return _with_cfg(cfg, lambda: layer_step(L, x, thr, compact, i))
        ref = call(0, {}).float()
        diffs = [float(((call(0, c).float() - ref).norm() / ref.norm().clamp_min(1e-12))) for c in cfgs]
        times = time_graphs([lambda i, c=c: call(i, c) for c in cfgs], 2 * L.nc)
        for c, us, dv in zip(cfgs, times, diffs):
            row = {"shape": shape, "expert_size": e, "batch": 1, "target": kept, "compact": compact, "cfg": c,
                   "layer_us": round(us, 2), "rel_diff_vs_default": dv}
            out.append(row)
            print(f"down_trials {row}", flush=True)
    del L
    torch.cuda.empty_cache()
    return out


def decide_trials(e=8, shape="llama3-8b", Ts=(1, 2), input_q=0.3, decide_qs=(0.5, 0.7), up_kept=0.65,
                  down_kept=0.4, cfgs=({},)):
    """What early decisions cost on the GPU: a layer with every expert on, input skip (input_q of |x| cut), the
    gate dial keeping up_kept of the up rows and down tau down_kept of the neurons (about the default conversion's
    50% budget, bench/results/dial-mix-smollm2.json), plain vs deciding on the channels above each decide_qs
    quantile of |x|; each variant's taus set so it keeps the same fractions (so the same bytes move), all timed in
    turn. The kernels add the partial-sum accumulators to the loads they already do: the prediction is no change.
    cfgs: kernel CONFIG overrides each deciding variant is also timed with (the plain one runs the defaults)."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(29)
    wg, wu, wd = L.dense[0]
    xc = torch.randn(512, L.d, device=DEV, dtype=DT, generator=gen)
    gs = ((xc @ wu.t()).float().abs().mean(0) * wd.float().norm(dim=0)).to(DT)  # E|up| x down-row norm
    norms = wd.float().norm(dim=0)
    out = []
    for T in Ts:
        x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
        mask = torch.ones(T, L.m // e, dtype=torch.bool, device=DEV)
        ax = x.abs().float().flatten()
        in_tau = float(torch.quantile(ax, input_q))
        xf = (x * (x.abs() >= in_tau)).float()
        g = torch.nn.functional.silu(xf @ wg.float().t())
        variants = []
        for q in (None,) + tuple(decide_qs):
            dec = 0.0 if q is None else float(torch.quantile(ax, q))
            xd = xf * (x.abs() >= dec).float() if dec else xf
            g_dec = torch.nn.functional.silu(xd @ wg.float().t()) if dec else g
            score = g_dec.abs() * gs.float()
            gate_tau = float(torch.quantile(score.flatten(), 1 - up_kept))
            keep = score >= gate_tau
            crit = (g_dec * (xd @ wu.float().t())).abs() * norms  # the down skip judges both partial sums
            down_tau = float(torch.quantile(crit[keep], 1 - down_kept / up_kept))
            variants.append((q, dec, gate_tau, (down_tau / norms.clamp_min(1e-12)).float()))

        def call(i, v, c=None, x=x, mask=mask, in_tau=in_tau):
            _, dec, gate_tau, tau, cfg = v
            return _with_cfg(cfg, lambda: K.sparse_mlp(
                x, L.packed[i % L.nc], None, None, None, mask, tau, "silu", path="triton", gate_scale=gs,
                gate_tau=gate_tau, input_tau=in_tau, decide_tau=dec, counts=c))
        variants = [v + (cfg,) for v in variants for cfg in (cfgs if v[0] is not None else ({},))]
        counts = []
        for v in variants:
            c = torch.zeros(2, T, dtype=torch.int32, device=DEV)
            assert torch.isfinite(call(0, v, c)).all()
            counts.append((c.float().mean(1) / L.m).tolist())
        times = time_graphs([lambda i, v=v: call(i, v) for v in variants], 2 * L.nc)
        for (q, _, _, _, cfg), us, (up, down) in zip(variants, times, counts):
            row = {"shape": shape, "expert_size": e, "batch": T, "decide_q": q, "cfg": cfg, "mlp_us": round(us, 2),
                   "up_kept": round(up, 4), "down_kept": round(down, 4)}
            out.append(row)
            print(f"decide_trials {row}", flush=True)
    del L
    torch.cuda.empty_cache()
    return out


def tile_trials():
    """Greedy: down-kernel configs, then gate/up configs, at llama3-8b T=1, kept 0.25/0.5, e=8 and e=32 (MLP only).
    Keeps the fastest in K.CONFIG for the rest of the run (the record says which)."""
    L = Layer("llama3-8b")
    gen = torch.Generator(device=DEV).manual_seed(7)
    x = torch.randn(1, L.d, device=DEV, dtype=DT, generator=gen)
    cases = []
    for e in (8, 32):
        for kept in (0.25, 0.5):
            cases.append((e, random_mask(1, L.m // e, kept, gen)))
    groups = [
        [{}, {"dn_BD": 256}, {"dn_BD": 256, "dn_KCHUNK": 256}, {"dn_BD": 512, "dn_KCHUNK": 256, "dn_warps": 4},
         {"dn_BN": 64, "dn_BD": 256, "dn_warps": 4}, {"dn_KCHUNK": 1024}, {"dn_warps": 4}, {"dn_stages": 4}],
        [{}, {"gu_BN": 16, "gu_BK": 512, "gu_stages": 4}, {"gu_BN": 16, "gu_BK": 256, "gu_stages": 4},
         {"gu_BK": 128, "gu_stages": 4}, {"gu_warps": 8}, {"gu_BK": 256, "gu_stages": 4}],
    ]
    log = []
    for grp in groups:
        base = dict(K.CONFIG)
        best = None
        for tr in grp:
            K.CONFIG.clear()
            K.CONFIG.update(base)
            K.CONFIG.update(tr)
            ts = []
            try:
                for e, mk in cases:
                    L.pack_for(e)
                    ts.append(round(time_sparse(L, x, mk, "triton", with_router=False), 2))
                tot = sum(ts)
            except Exception as ex:  # a tile that does not compile / fit
                ts, tot = str(ex)[:80], float("inf")
            log.append({"cfg": tr, "us_e8_k25_k50_e32_k25_k50": ts})
            print(f"  tiles {tr}: {ts}", flush=True)
            if best is None or tot < best[1]:
                best = (tr, tot)
        K.CONFIG.clear()
        K.CONFIG.update(base)
        K.CONFIG.update(best[0])
    print("tiles picked:", dict(K.CONFIG), flush=True)
    del L
    torch.cuda.empty_cache()
    return {"picked": dict(K.CONFIG), "log": log}


def bench_router(Ts=(1, 4, 16, 2048), es=(8, 32)):
    """Router + selection alone at llama3-8b (r=64), per call, us."""
    rows = []
    d, m, r = 4096, 14336, 64
    g = torch.Generator(device=DEV).manual_seed(3)
    for e in es:
        n_e = m // e
        nc = 8
        rw = [((torch.randn(r, d, device=DEV, dtype=DT, generator=g) * d ** -0.5),
               torch.randn(r, device=DEV, dtype=DT, generator=g) * 0.1,
               torch.randn(n_e, r, device=DEV, dtype=DT, generator=g) * r ** -0.5,
               torch.randn(n_e, device=DEV, dtype=DT, generator=g) * 0.1) for _ in range(nc)]
        for T in Ts:
            x = torch.randn(T, d, device=DEV, dtype=DT, generator=g)
            us = time_graph(lambda i: K.route(x, *rw[i % nc], 0.5), 2 * nc)
            row = {"expert_size": e, "n_e": n_e, "batch": T, "router_us": round(us, 2),
                   "router_mode": K.CONFIG["router"] if T <= 16 else "T>16"}
            if T <= 16:  # every T <= 16 path: three launches, R1 + (R2 with select), one persistent launch
                old = K.CONFIG["router"]
                try:
                    for mode in ("three", "r2sel", "persistent"):
                        K.CONFIG["router"] = mode
                        row[f"router_{mode}_us"] = round(time_graph(lambda i: K.route(x, *rw[i % nc], 0.5),
                                                                    2 * nc), 2)
                finally:
                    K.CONFIG["router"] = old
            rows.append(row)
            print(f"router e={e} n_e={n_e} T={T}: {us:.2f} us (three {row.get('router_three_us')}, "
                  f"r2sel {row.get('router_r2sel_us')}, persistent {row.get('router_persistent_us')})", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# end to end: Llama-3-8B-shaped model, random weights
# ----------------------------------------------------------------------------------------------------------------
def _graph_step(fn, reps=20, warm=3):
    """Median ms of one captured call of fn()."""
    return time_graph(lambda _i: fn(), 1, reps=reps, warm=warm) / 1000.0


DECODE_WARM, DECODE_REPS = 3, 20  # replays of each captured decode step (all inside the StaticCache)


def bench_e2e(E=8, kepts=(0.5, 0.25), batches=(1, 4, 16), prefill_T=2048, prompt_len=128, compiled_batches=()):
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from densesparse import arch, runtime
    out = {"model": "LlamaForCausalLM, Llama-3-8B shape (hidden 4096, intermediate 14336, 32 layers, 32 heads, "
                    "8 kv heads, vocab 128256), bf16, sdpa",
           "weights": "RANDOM (HF init, routers random with w2 x4); density is set by the router threshold "
                      "budget, calibrated per layer by bisection on 256 captured MLP inputs",
           "transformers": transformers.__version__, "expert_size": E, "n_experts": 14336 // E,
           "router_width": 64, "decode": [], "prefill": [], "calibration": []}
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.eval()
    spec = {"layout": arch.LAYOUTS["LlamaForCausalLM"].to_dict(), "activation": "silu", "hidden_size": 4096,
            "n_shared": 0, "expert_size": E, "n_experts": 14336 // E, "router_width": 64}
    mlps = runtime.install(model, spec)
    with torch.no_grad():
        for mm in mlps:
            mm.router.w2.weight.mul_(4.0)
            mm.threshold = 1.0
    print(f"e2e: model built in {time.time() - t0:.1f}s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    V = cfg.vocab_size
    g = torch.Generator(device=DEV).manual_seed(11)

    # capture MLP inputs (dense) for calibration
    caps = []
    hooks = [mm.register_forward_pre_hook(lambda mod, args: caps.append(args[0].reshape(-1, 4096)[:256].clone()))
             for mm in mlps]
    with torch.no_grad():
        model(input_ids=torch.randint(0, V, (1, 256), device=DEV, generator=g), use_cache=False, logits_to_keep=1)
    for h in hooks:
        h.remove()

    def kept_of(mm, xin, t):
        r = mm.router
        return K.route(xin, r.w1.weight, r.w1.bias, r.w2.weight, r.w2.bias, t).float().mean().item()

    thresholds, fracs = {}, {}
    for kept in kepts:
        ths, ks = [], []
        for mm, xin in zip(mlps, caps):
            hi = bisect_threshold(lambda t, mm=mm, xin=xin: kept_of(mm, xin, t), kept, steps=14)
            ths.append(hi)
            ks.append(kept_of(mm, xin, hi))
        thresholds[kept] = ths
        fracs[kept] = ks  # each layer's measured fraction of selected experts: SparseMLP.expert_frac, as a budget
        meas = sum(ks) / len(ks)
        out["calibration"].append({"target": kept, "measured_kept": round(meas, 4),
                                   "threshold_min": round(min(ths), 4), "threshold_max": round(max(ths), 4),
                                   "expert_frac_min": round(min(ks), 4), "expert_frac_max": round(max(ks), 4),
                                   "compact_layers_at_b1": sum(f <= runtime.COMPACT_BELOW for f in ks)})
        print(f"e2e calibration: target {kept} measured kept {meas:.4f} thresholds {min(ths):.3f}..{max(ths):.3f}",
              flush=True)
    del caps

    def set_mode(kept):
        for i, mm in enumerate(mlps):
            mm.threshold = 1.0 if kept == 1.0 else thresholds[kept][i]
            # as apply_budget sets it from a calibrated spec: batch-1 steps of layers at or below
            # runtime.COMPACT_BELOW take the compacted kernels
            mm.expert_frac = 1.0 if kept == 1.0 else fracs[kept][i]

    def decode_nocache_ms(B):
        # previous rounds' measure (runs 1-5), kept for reference: full forward of B new tokens, no KV cache, graph
        tok = torch.randint(0, V, (B, 1), device=DEV, generator=g)

        def step():
            with torch.no_grad():
                return model(input_ids=tok, use_cache=False, logits_to_keep=1).logits
        return _graph_step(step)

    def recording_router(out):
        """Swap kernels.route and kernels.route_logits for wrappers that append what they return to `out`: the mask
        where the select kernel runs, the logits where the gate/up tiles select (routed selection, batch-1 calls).
        Returns the function that puts the real ones back."""
        real = (K.route, K.route_logits)

        def wrap(f):
            def rec(*a):
                r = f(*a)
                out.append(r.clone())
                return r
            return rec
        K.route, K.route_logits = wrap(real[0]), wrap(real[1])

        def restore():
            K.route, K.route_logits = real
        return restore

    def eager_repeat(step, reset, rel):
        """Two eager decode steps from the same cache state, each layer's MLP input / output and router output (the
        mask, or the logits on the routed path) recorded; then layer 0's MLP called 20 times on one recorded input
        (router and kernels alone)."""
        def trace():
            tr = {"in": [], "out": [], "mask": []}
            def hook(mod, args, o):  # returns None: a forward hook's return value would replace the output
                tr["in"].append(args[0].detach().clone())
                tr["out"].append(o.detach().clone())
            hooks = [mm.register_forward_hook(hook) for mm in mlps]
            restore = recording_router(tr["mask"])
            try:
                reset()
                lg = step().clone()
            finally:
                restore()
                for hk in hooks:
                    hk.remove()
            torch.cuda.synchronize()
            return lg, tr
        (lg_a, a), (lg_b, b) = trace(), trace()
        layers = [{"layer": i, "in_rel": rel(a["in"][i], b["in"][i]), "out_rel": rel(a["out"][i], b["out"][i]),
                   "mask_flips": int((a["mask"][i] != b["mask"][i]).sum())} for i in range(len(mlps))]
        first = [next((r["layer"] for r in layers if r[k] > 0), None) for k in ("out_rel", "mask_flips")]
        x0 = a["in"][0]
        with torch.no_grad():
            ys, ms = [], []
            for _ in range(20):
                mk = []
                restore = recording_router(mk)
                try:
                    ys.append(mlps[0](x0).clone())
                finally:
                    restore()
                ms.append(mk[0])
        diff = [rel(y, ys[0]) for y in ys[1:]]
        return {"logits_rel": rel(lg_a, lg_b), "first_layer_out_differs": first[0],
                "first_layer_mask_differs": first[1], "layers": layers,
                "layer0_repeat": {"calls": 20, "masks_all_equal": all(bool((m == ms[0]).all()) for m in ms),
                                  "outputs_differing": sum(d > 0 for d in diff), "max_rel": max(diff)}}

    def capture_decode(B, check=False, fwd=None):
        """Real decode: prefill prompt_len tokens into a StaticCache, then one decode step (input_ids [B, 1],
        position_ids [B, 1] on CUDA) captured in a CUDA graph (the model's current budget baked in), for
        time_decode to replay. transformers 5.17's StaticLayer writes at its own `cumulative_length` (a CUDA long
        scalar it advances in place, inside the graph), not at a caller's cache_position; the mask's query offset
        is that counter too. So every replay advances the cache by one token: position_ids advances in the graph
        too (pos.add_(1)), and before the timed replays the counters and pos are reset in place to prompt_len (the
        warm-up calls would otherwise spend slots; run 4's index_copy_ assert was the cache running past
        max_cache_len). DECODE_WARM + DECODE_REPS replays stay inside the cache. Returns (handle, checks)."""
        from transformers import StaticCache
        cache = StaticCache(config=cfg, max_cache_len=prompt_len + 64)
        prompt = torch.randint(0, V, (B, prompt_len), device=DEV, generator=g)
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        counters = [lay.cumulative_length for lay in cache.layers]
        assert all(isinstance(c, torch.Tensor) and c.is_cuda and int(c) == prompt_len for c in counters), \
            "StaticLayer.cumulative_length is not a CUDA counter at prompt_len"
        tok = torch.randint(0, V, (B, 1), device=DEV, generator=g)
        pos = torch.full((B, 1), prompt_len, device=DEV, dtype=torch.long)

        def reset():
            for c in counters:
                c.fill_(prompt_len)
            pos.fill_(prompt_len)

        def step():
            with torch.no_grad():
                lg = (model if fwd is None else fwd)(input_ids=tok, position_ids=pos, past_key_values=cache,
                                                     use_cache=True, logits_to_keep=1).logits
                pos.add_(1)
            return lg

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        reset()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            lg_out = step()
        reset()
        torch.cuda.synchronize()
        chk = None
        if check:
            # (a) the replayed step at position prompt_len vs the same step run eagerly on the same cache state
            # (same kernels: checks the capture); (b) vs a full no-cache forward of prompt + tok (checks the cache,
            # positions and mask; for the sparse model (b) also swaps the MLP path: T=129 runs the dense MLP
            # (dispatch), so (b) is only meaningful for dense); (c) sparse only: two eager steps on the same state
            # compared with each other, per layer (eager_repeat: is the step deterministic, and where not, why)
            def rel(a, r):
                return round(((a.float() - r.float()).norm() / r.float().norm()).item(), 5)
            reset()
            lg_eager = step().clone()
            reset()
            gr.replay()
            torch.cuda.synchronize()
            with torch.no_grad():
                ref = model(input_ids=torch.cat([prompt, tok], 1), use_cache=False, logits_to_keep=1).logits
            chk = {"graph_vs_eager_rel_err": rel(lg_out, lg_eager), "rel_err_vs_nocache": rel(lg_out, ref),
                   "argmax_agree_vs_nocache": round((lg_out.argmax(-1) == ref.argmax(-1)).float().mean().item(), 3)}
            if any(mm.threshold < 1.0 for mm in mlps):
                old = K.CONFIG["dn_deterministic"]
                for key, det in (("eager_repeat_atomic", False), ("eager_repeat_deterministic", True)):
                    K.CONFIG["dn_deterministic"] = det
                    try:
                        chk[key] = eager_repeat(step, reset, rel)
                    except Exception as ex:  # a diagnostic: record, keep the timed sections on the static path
                        chk[key] = f"{type(ex).__name__}: {str(ex)[:300]}"
                K.CONFIG["dn_deterministic"] = old
        handle = {"graph": gr, "reset": reset, "counters": counters, "pos": pos, "keep": (cache, prompt, tok, lg_out)}
        return handle, chk

    def time_decode(handles):
        """Median ms per step of each captured step, the graphs replayed in turn (the order reversed every other
        round), so clock drift under the sustained load hits dense and sparse alike."""
        for h in handles:
            h["reset"]()
        ts = replay_in_turn([h["graph"] for h in handles], DECODE_REPS, DECODE_WARM)
        for h in handles:
            adv = int(h["counters"][0]) - prompt_len
            assert adv == DECODE_WARM + DECODE_REPS and int(h["pos"][0, 0]) == prompt_len + adv, \
                ("cache did not advance", adv)
        return [statistics.median(t) for t in ts]

    def decode_dynamic_eager(B, steps=12):
        """Fallback: DynamicCache, eager (no graph); prefill then `steps` decode steps, median step time."""
        from transformers import DynamicCache
        cache = DynamicCache(config=cfg)
        prompt = torch.randint(0, V, (B, prompt_len), device=DEV, generator=g)
        tok = torch.randint(0, V, (B, 1), device=DEV, generator=g)
        ts = []
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for i in range(steps):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                b.record()
                b.synchronize()
                if i >= 2:
                    ts.append(a.elapsed_time(b))
        del cache
        return statistics.median(ts), None

    def decode_side_by_side(B, setups, check=False, fwd=None):
        """{key: (ms per step, checks, how)} for each (key, setup) of setups: setup() sets the model's budget, the
        step is captured under it; then all captured steps are timed together (time_decode). Where the static
        cache + graph path fails, DynamicCache eager steps, timed one by one."""
        handles, done = {}, {}
        for key, setup in setups:
            restore = setup()
            try:
                if not out.get("static_failed"):
                    try:
                        handles[key], chk = capture_decode(B, check, fwd)
                        done[key] = (None, chk, "static+graph")
                        continue
                    except Exception as ex:
                        import traceback
                        traceback.print_exc()
                        out["static_failed"] = f"{type(ex).__name__}: {str(ex)[:300]}"
                        torch.cuda.synchronize()
                done[key] = (*decode_dynamic_eager(B), "dynamic+eager")
            finally:
                if restore:
                    restore()
        if handles:
            for key, ms in zip(handles, time_decode(list(handles.values()))):
                done[key] = (ms, *done[key][1:])
        del handles
        torch.cuda.empty_cache()
        return done

    def prefill_ms():
        ids = torch.randint(0, V, (1, prefill_T), device=DEV, generator=g)
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            ts = []
            for _ in range(5):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    def budget(kept):
        return lambda: set_mode(kept)

    modes = (1.0,) + tuple(kepts)
    res, how, checks = {}, {}, []
    for B in batches:
        try:
            got = decode_side_by_side(B, [(kept, budget(kept)) for kept in modes], check=(B == 1))
        except Exception as ex:  # record, go on
            got = {}
            out.setdefault("errors", []).append(f"decode B={B}: {type(ex).__name__}: {str(ex)[:300]}")
            print("e2e decode error:", out["errors"][-1], flush=True)
        for kept in modes:
            ms, chk, kind = got.get(kept, (None, None, None))
            res[(kept, B)], how[(kept, B)] = ms, kind
            if chk:
                checks.append({"kept": kept, "batch": B, **chk})
            print(f"e2e decode (KV cache, {kind}) kept={kept} B={B}: {ms} ms/step", chk or "", flush=True)
    for kept in modes:
        set_mode(kept)
        try:  # the old no-KV-cache step at B=1, for comparison with runs 1-5
            res[(kept, "nocache1")] = decode_nocache_ms(1)
        except Exception as ex:
            res[(kept, "nocache1")] = None
            print("e2e no-cache decode error:", ex, flush=True)
        res[(kept, "prefill")] = prefill_ms()
        print(f"e2e prefill kept={kept} T={prefill_T}: {res[(kept, 'prefill')]:.2f} ms", flush=True)
    # B=1 with the compact rule off (every layer on the old tiles) and on: what runtime.COMPACT_BELOW buys end to
    # end, both timed side by side
    saved = runtime.COMPACT_BELOW

    def rule(kept, below):
        def setup():
            set_mode(kept)
            runtime.COMPACT_BELOW = below
            return lambda: setattr(runtime, "COMPACT_BELOW", saved)
        return setup

    for kept in kepts:
        try:
            got = decode_side_by_side(1, [("rule_off_ms", rule(kept, -1.0)), ("rule_on_ms", rule(kept, saved))])
            pair = {k: round(v[0], 3) if v[0] else None for k, v in got.items()}
        except Exception as ex:
            pair = {"rule_off_ms": None, "rule_on_ms": None}
            print("e2e rule on/off error:", ex, flush=True)
        set_mode(kept)
        out.setdefault("decode_b1_compact_rule", []).append(
            {"target": kept, "compact_layers": sum(mm.expert_frac <= saved for mm in mlps), **pair})
        print(f"e2e decode B=1 kept={kept}: compact rule off {pair['rule_off_ms']} ms, on {pair['rule_on_ms']} ms",
              flush=True)
    kmeas = {c["target"]: c["measured_kept"] for c in out["calibration"]}
    if compiled_batches:
        out["decode_compiled"] = decode_compiled(model, budget, decode_side_by_side, kepts, kmeas, compiled_batches)
    kinds = sorted(set(how.values()))
    out["kv_cache"] = {"cache": "StaticCache" if kinds == ["static+graph"] else "/".join(kinds) or "none",
                       "cuda_graphs": kinds == ["static+graph"], "prompt_tokens": prompt_len,
                       "max_cache_len": prompt_len + 64,
                       "note": "prefill prompt_tokens into the cache, then decode steps at positions prompt_len.. "
                               "prompt_len+22 (one input token per sequence per step, logits of it only)"}
    out["kv_check"] = checks
    for kept in kepts:
        for B in batches:
            out["decode"].append(decode_row(kmeas[kept], kept, B, res[(1.0, B)], res[(kept, B)], how.get((kept, B))))
        dn1, sp1 = res.get((1.0, "nocache1")), res.get((kept, "nocache1"))
        out.setdefault("decode_nocache_b1", []).append(
            {"kept": kmeas[kept], "dense_ms": dn1 and round(dn1, 3), "sparse_ms": sp1 and round(sp1, 3)})
        out["prefill"].append({"kept": kmeas[kept], "target": kept, "tokens": prefill_T,
                               "dense_ms": round(res[(1.0, "prefill")], 2),
                               "sparse_ms": round(res[(kept, "prefill")], 2)})
    del model, mlps
    torch.cuda.empty_cache()
    return out


def decode_row(kept, target, B, dn, sp, cache):
    """One decode record row from the dense and sparse ms per step (None where that step failed)."""
    return {"kept": kept, "target": target, "batch": B, "cache": cache,
            "dense_tok_s": None if dn is None else round(B / dn * 1e3, 1),
            "sparse_tok_s": None if sp is None else round(B / sp * 1e3, 1),
            "dense_ms": dn and round(dn, 3), "sparse_ms": sp and round(sp, 3),
            "speedup": round(dn / sp, 3) if dn and sp else None}


def decode_compiled(model, budget, decode_side_by_side, kepts, kmeas, batches):
    """The same decode step with the model compiled: torch.compile(fullgraph=True, dynamic=False, default mode)
    around the whole forward, then captured in the same hand-made CUDA graph. Inductor fuses the HF glue (RMSNorm,
    rotary, residual adds, the dense MLP's act * up) for dense and sparse alike; the sparse MLP runs the custom
    ops inside the compiled graph. One compile per (kept, batch): the thresholds and the shapes are guarded."""
    import torch._dynamo as dynamo
    limit = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo.config, limit, 64)
    fwd = torch.compile(model, fullgraph=True, dynamic=False)
    rows = []
    for B in batches:
        t0 = time.time()
        got = decode_side_by_side(B, [(kept, budget(kept)) for kept in (1.0,) + tuple(kepts)], fwd=fwd)
        print(f"compiled decode B={B}: { {k: v[0] for k, v in got.items()} } ms/step ({time.time() - t0:.0f} s with "
              "the compiles)", flush=True)
        rows += [decode_row(kmeas[kept], kept, B, got[1.0][0], got[kept][0], got[kept][2]) for kept in kepts]
    dynamo.reset()
    return rows


def write_record(res, out, t0=None):
    """res as JSON at out (its folder made if missing); with t0, res["wall_s"] = seconds since t0 first."""
    if t0 is not None:
        res["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def run_info(note):
    """The head of every record: device, versions, commit (DS_COMMIT: the device copy's git metadata is stale),
    command line and note."""
    import triton
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("DS_COMMIT", "unknown"), "command": " ".join(sys.argv), "note": note}


def _with_cfg(cfg, fn):
    """fn run with K.CONFIG updated by cfg (restored after): a graph captured inside keeps cfg's kernels."""
    old = {k: K.CONFIG[k] for k in cfg}
    K.CONFIG.update(cfg)
    try:
        return fn()
    finally:
        K.CONFIG.update(old)


def compact_trials(quick=False, shape="llama3-8b", e=8):
    """Tiles of the compacted decode path (MLP alone, llama3-8b, e=8, T 1/2, kept 0.25/0.5, random masks), the old
    path in the same interleaved graphs as the yardstick. Greedy: gate/up group first, then down; keeps the fastest
    (summed over the cases) in K.CONFIG for the rest of the run (the record says which)."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(11)
    cases = []
    for T in (1, 2):
        x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
        for kept in (0.25, 0.5):
            cases.append((T, kept, x, random_mask(T, L.m // e, kept, gen)))
    # runs C1-C5 of this round (bench/GPU_NOTES.md) also tried c_gu_BN 16/64, gu_BK 128/512, c_dn_BN 64, c_dn_BD 128,
    # fixed chunks of 128/256/512 compacted rows, h in neuron order with the old down kernel reading it where the
    # mask selects, the next blocks loaded one step ahead: all slower; these groups: the list made by every gate/up
    # program vs one separate kernel, and the down kernel's split / skip / stages / warps
    groups = [
        [{}, {"c_fused": False}],
        [{}, {"c_dn_skip": True}, {"c_dn_split": 14}, {"c_dn_split": 56}, {"c_dn_stages": 2}, {"c_dn_warps": 2}],
    ]
    log = []
    for grp in groups:
        base = dict(K.CONFIG)
        tot = [0.0] * len(grp)
        for T, kept, x, mask in cases:
            def mlp(i, cfg, compact):
                c = {"compact": compact}
                c.update(cfg)
                return _with_cfg(c, lambda: K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None, "silu",
                                                         path="triton"))
            fns = [lambda i: mlp(i, {}, False)] + [lambda i, tr=tr: mlp(i, tr, True) for tr in grp]
            try:
                ts = time_graphs(fns, 2 * L.nc, reps=20)
            except Exception as ex:  # one tile that does not compile / fit: time them one by one
                ts = [time_graph(fns[0], 2 * L.nc)]
                for f in fns[1:]:
                    try:
                        ts.append(time_graph(f, 2 * L.nc))
                    except Exception as ex2:
                        print("  tile failed:", str(ex2)[:120], flush=True)
                        ts.append(float("inf"))
            for j in range(len(grp)):
                tot[j] += ts[1 + j]
            log.append({"batch": T, "kept": kept, "old_us": round(ts[0], 2),
                        "compact_us": [{"cfg": tr, "us": round(t, 2)} for tr, t in zip(grp, ts[1:])]})
            print(f"  compact tiles T={T} kept={kept}: old {ts[0]:.1f} | " +
                  " ".join(f"{tr or 'base'} {t:.1f}" for tr, t in zip(grp, ts[1:])), flush=True)
        best = min(range(len(grp)), key=lambda j: tot[j])
        K.CONFIG.clear()
        K.CONFIG.update(base)
        K.CONFIG.update(grp[best])
    picked = {k: K.CONFIG[k] for k in K.CONFIG if k.startswith("c_") or k.startswith("gu_") or k.startswith("dn_")}
    print("compact tiles picked:", picked, flush=True)
    del L
    torch.cuda.empty_cache()
    return {"picked": picked, "log": log}


def bench_compact(copy_gbps, es=(8, 16, 32), kepts=(0.5, 0.25), Ts=(1, 2), shape="llama3-8b", extra_T=(4,)):
    """Old vs compacted Triton decode path, side by side in one set of interleaved graphs per case: dense;
    router + old MLP; router + compacted MLP; the two MLPs alone (random masks); the compaction kernel alone
    (active_blocks); the router alone; the pre-sliced cuBLAS ideal (kept rows of each weight, dense GEMV). Floor =
    the union's MLP bytes at the copy rate. Also each case's outputs old vs compact (rel err, float). extra_T (e=8
    only): T where the Triton path is not the default (dense dispatch), for what the compacted kernels would give."""
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(12)
    L = Layer(shape)
    d, m = L.d, L.m
    for e in es:
        L.pack_for(e)
        n_e = m // e
        for T in tuple(Ts) + (tuple(extra_T) if e == es[0] else ()):
            x = torch.randn(T, d, device=DEV, dtype=DT, generator=gen)
            for kept in kepts:
                mask = random_mask(T, n_e, kept, gen)
                union = mask.any(0).float().mean().item()
                mk = max(1, round(union * m))
                sl = [(wg[:mk].contiguous(), wu[:mk].contiguous(), wd[:, :mk].contiguous())
                      for (wg, wu, wd) in L.dense]

                def mlp(i, compact, fused=True):
                    return _with_cfg({"compact": compact, "c_fused": fused}, lambda: K.sparse_mlp(
                        x, L.packed[i % L.nc], None, None, None, mask, None, "silu", path="triton"))

                def full(i, compact):
                    K.route(x, *L.router[i % L.nc], 0.5)
                    return mlp(i, compact)
                ys = [mlp(0, False).float(), mlp(0, True).float()]
                diff = ((ys[0] - ys[1]).norm() / ys[0].norm()).item()
                blk = K.active_blocks(mask, 0)
                assert blk[0].item() == mask.any(0).sum().item()
                ts = time_graphs([
                    lambda i: dense_mlp(x, *L.dense[i % L.nc]),
                    lambda i: full(i, False),
                    lambda i: full(i, True),
                    lambda i: mlp(i, False),
                    lambda i: mlp(i, True),
                    lambda i: mlp(i, True, False),
                    lambda i: K.active_blocks(mask, 0),
                    lambda i: K.route(x, *L.router[i % L.nc], 0.5),
                    lambda i: dense_mlp(x, *sl[i % L.nc]),
                ], 2 * L.nc, reps=30)
                del sl
                dense, old, comp, m_old, m_comp, m_kern, cpt, router, ideal = ts
                floor = union * 3 * m * d * 2 / (copy_gbps * 1e9) * 1e6
                row = {"shape": shape, "expert_size": e, "batch": T, "kept": kept, "union_frac": round(union, 4),
                       "dense_us": round(dense, 2), "old_us": round(old, 2), "compact_us": round(comp, 2),
                       "mlp_old_us": round(m_old, 2), "mlp_compact_us": round(m_comp, 2),
                       "mlp_compact_sep_kernel_us": round(m_kern, 2), "compaction_kernel_us": round(cpt, 2),
                       "router_us": round(router, 2),
                       "ideal_us": round(ideal, 2), "floor_mlp_us": round(floor, 2),
                       "compact_vs_old_rel": diff, "default_path": T <= K.DECODE_MAX_T}
                rows.append(row)
                print(f"compact e={e} T={T} kept={kept} union {union:.3f}: dense {dense:.1f} | router+MLP old {old:.1f}"
                      f" compact {comp:.1f} | MLP old {m_old:.1f} compact {m_comp:.1f} (sep. kernel {m_kern:.1f}) | "
                      f"ideal {ideal:.1f} floor {floor:.1f} | compaction {cpt:.1f} router {router:.1f} | "
                      f"rel {diff:.1e}",
                      flush=True)
    del L
    torch.cuda.empty_cache()
    return rows


def kernel_times(call, n=20):
    """{kernel name: device us per call} of call(i) (torch.profiler over n calls, after 3 warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile
    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            call(i)
        torch.cuda.synchronize()
    return {ev.key[:40]: round(ev.device_time_total / n, 2) for ev in prof.key_averages()
            if getattr(ev, "device_time_total", 0) > 0}


def profile_compact(cases=((1, 0.25), (1, 0.5), (2, 0.5), (4, 0.5)), e=8, shape="llama3-8b"):
    """Per-kernel device time (torch.profiler, us per call) of the old and the compacted MLP (the CONFIG of the run,
    then variants: the list by a separate kernel, the down kernel skipping zero h rows), llama3-8b e=8: which kernel
    gains or loses."""
    L = Layer(shape)
    L.pack_for(e)
    gen = torch.Generator(device=DEV).manual_seed(13)
    out = []
    for T, kept in cases:
        x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
        mask = random_mask(T, L.m // e, kept, gen)
        for name, cfg in (("old", {"compact": False}), ("compact", {"compact": True}),
                          ("sep-list", {"compact": True, "c_fused": False}),
                          ("skip", {"compact": True, "c_dn_skip": True})):
            def call(i):
                return _with_cfg(cfg, lambda: K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None,
                                                            "silu", path="triton"))
            ks = kernel_times(call)
            out.append({"batch": T, "kept": kept, "variant": name, "kernels_us": ks})
            print(f"profile T={T} kept={kept} {name}: {ks}", flush=True)
    del L
    torch.cuda.empty_cache()
    return out


def bench_compact_dial(Ts=(1, 2), e=8, shape="llama3-8b"):
    """The gate-dial case of bench_gate_dial (router ~50% experts, gate_tau dropping ~half of their up rows), old vs
    compacted path, two-phase tile (the default), graphs interleaved: router + MLP and MLP alone."""
    L, gen, gss = _gate_layer(shape, e)
    rows = []
    for T in Ts:
        x, thr, masks, gate_tau = _gate_case(L, gen, gss, T, e, 0.5, 0.5)

        def mlp(i, compact, route):
            c = i % L.nc
            mask = K.route(x, *L.router[c], thr) if route else masks[c]
            return _with_cfg({"compact": compact}, lambda: K.sparse_mlp(
                x, L.packed[c], None, None, None, mask, None, "silu", path="triton", gate_scale=gss[c],
                gate_tau=gate_tau))
        ys = [mlp(0, False, False).float(), mlp(0, True, False).float()]
        diff = ((ys[0] - ys[1]).norm() / ys[0].norm()).item()
        old, comp, m_old, m_comp = time_graphs([lambda i: mlp(i, False, True), lambda i: mlp(i, True, True),
                                                lambda i: mlp(i, False, False), lambda i: mlp(i, True, False)],
                                               2 * L.nc, reps=30)
        rows.append({"shape": shape, "expert_size": e, "batch": T, "gate_tau": gate_tau,
                     "experts_kept": round(sum(mk.float().mean().item() for mk in masks) / L.nc, 4),
                     "old_us": round(old, 2), "compact_us": round(comp, 2), "mlp_old_us": round(m_old, 2),
                     "mlp_compact_us": round(m_comp, 2), "compact_vs_old_rel": diff})
        print(f"compact dial e={e} T={T}: router+MLP old {old:.1f} compact {comp:.1f} | MLP old {m_old:.1f} compact "
              f"{m_comp:.1f} | rel {diff:.1e}", flush=True)
    del L
    torch.cuda.empty_cache()
    return rows


def _crossover_case(L, gen, gss, T, e, frac, gate_drop):
    """As _gate_case, but the router threshold is bisected for every weight copy's own router, so that every copy
    selects the same fraction of experts (with copy 0's threshold the copies' random routers select different
    fractions, which blurs a sweep over the fraction)."""
    x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
    thrs = [bisect_threshold(copy_frac(L, c, x), frac) for c in range(L.nc)]
    masks = [K.route(x, *L.router[c], thrs[c]) for c in range(L.nc)]
    score = torch.nn.functional.silu(x @ L.dense[0][0].t()).float().abs() * gss[0].float()
    gate_tau = torch.quantile(score[masks[0].repeat_interleave(e, dim=1)], gate_drop).item()
    return x, thrs, masks, gate_tau


def bench_compact_crossover(fracs=(0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5), es=(8, 32), rounds=2, T=1,
                            shape="llama3-8b", gate_drop=0.5):
    """Where the compacted decode path stops winning at batch 1 (runtime.COMPACT_BELOW): for each expert fraction,
    each weight copy's router threshold bisected to select it, then router + MLP old vs compacted (the MLP on that
    router call's mask) in one set of interleaved graphs, without and with the gate dial (gate_tau = the gate_drop
    quantile of the selected neurons' scores), and the two MLPs alone on the precomputed masks. `rounds` passes
    over all fractions (the spread between them is the run-to-run noise)."""
    rows = []
    for e in es:
        L, gen, gss = _gate_layer(shape, e)
        cases = [(f, *_crossover_case(L, gen, gss, T, e, f, gate_drop)) for f in fracs]
        for rnd in range(rounds):
            for frac, x, thrs, masks, gate_tau in cases:
                def mlp(i, compact, route, dial):
                    c = i % L.nc
                    mask = K.route(x, *L.router[c], thrs[c]) if route else masks[c]
                    return K.sparse_mlp(x, L.packed[c], None, None, None, mask, None, "silu", path="triton",
                                        gate_scale=gss[c] if dial else None, gate_tau=gate_tau if dial else 0.0,
                                        compact=compact)
                diff = {}
                for dial in (False, True):
                    ys = [mlp(0, cp, False, dial).float() for cp in (False, True)]
                    diff[dial] = ((ys[0] - ys[1]).norm() / ys[0].norm()).item()
                ts = time_graphs([lambda i, cp=cp, dl=dl, rt=rt: mlp(i, cp, rt, dl)
                                  for rt, dl in ((True, False), (True, True), (False, False))
                                  for cp in (False, True)], 2 * L.nc, reps=30)
                got = sum(mk.float().mean().item() for mk in masks) / L.nc
                row = {"shape": shape, "expert_size": e, "batch": T, "round": rnd, "target_frac": frac,
                       "expert_frac": round(got, 4), "expert_frac_copies": [round(mk.float().mean().item(), 4)
                                                                            for mk in masks],
                       "thresholds": [round(t, 5) for t in thrs], "gate_tau": gate_tau,
                       "old_us": round(ts[0], 2), "compact_us": round(ts[1], 2),
                       "dial_old_us": round(ts[2], 2), "dial_compact_us": round(ts[3], 2),
                       "mlp_old_us": round(ts[4], 2), "mlp_compact_us": round(ts[5], 2),
                       "gain": round(1 - ts[1] / ts[0], 4), "dial_gain": round(1 - ts[3] / ts[2], 4),
                       "compact_vs_old_rel": diff[False], "dial_compact_vs_old_rel": diff[True]}
                rows.append(row)
                print(f"crossover e={e} T={T} round {rnd} experts {got:.3f}: router+MLP old {ts[0]:.1f} compact "
                      f"{ts[1]:.1f} ({100 * row['gain']:+.1f}%) | dial old {ts[2]:.1f} compact {ts[3]:.1f} "
                      f"({100 * row['dial_gain']:+.1f}%) | MLP old {ts[4]:.1f} compact {ts[5]:.1f}", flush=True)
        del L, gss
        torch.cuda.empty_cache()
    return rows


def _dial_case(L, gss, dn, gen, f, T, e):
    """One real layer's fractions f (bench/dial_mix.py) replayed at this shape: input channels cut at the
    (1 - input) quantile of |x|; experts: each weight copy's router threshold bisected to f["experts"] (all on,
    no router, where the layer keeps them all); early decisions (records with "decide" below "input") on the
    channels above the (1 - decide) quantile; gate dial keeping up_rows / gate_rows of the selected neurons, down
    tau keeping down / up_rows of those, both judged as the kernels judge them (quantiles over copy 0)."""
    x = torch.randn(T, L.d, device=DEV, dtype=DT, generator=gen)
    ax = x.abs().float().flatten()
    tin = torch.quantile(ax, 1 - f["input"]).item() if f["input"] < 0.999 else 0.0
    xi = x * (x.abs() >= tin) if tin > 0 else x
    decide = f.get("decide", f["input"])
    tdec = torch.quantile(ax, 1 - decide).item() if decide < f["input"] - 1e-3 else 0.0
    xd = x * (x.abs() >= tdec) if tdec > 0 else xi
    routed = f["experts"] < 0.999
    thrs = [bisect_threshold(copy_frac(L, c, x), f["experts"]) if routed else 1.0 for c in range(L.nc)]
    masks = [K.route(x, *L.router[c], thrs[c]) if routed else torch.ones(T, L.m // e, dtype=torch.bool, device=DEV)
             for c in range(L.nc)]
    wg, wu, _ = L.dense[0]
    sel = masks[0].repeat_interleave(e, dim=1)
    a_dec = torch.nn.functional.silu(xd.float() @ wg.float().t())  # = g where the layer does not decide early
    score = a_dec.abs() * gss[0].float()
    keep_up = min(1.0, f["up_rows"] / max(f["gate_rows"], 1e-9))
    gate_tau = torch.quantile(score[sel], 1 - keep_up).item() if keep_up < 0.999 else 0.0
    kept = sel & (score >= gate_tau)
    hs = (a_dec * (xd.float() @ wu.float().t())).abs() * dn[0]  # the down skip judges both partial sums
    keep_dn = min(1.0, f["down"] / max(f["up_rows"], 1e-9))
    down_tau = torch.quantile(hs[kept], 1 - keep_dn).item() if keep_dn < 0.999 and kept.any() else 0.0
    return x, tin, routed, thrs, masks, gate_tau, down_tau, tdec if (gate_tau > 0 or down_tau > 0) else 0.0


def bench_dial_mix(mix, Ts=(1,), shape="llama3-8b"):
    """The real model's budgets (bench/dial_mix.py record: per layer, the fractions each dial keeps) replayed layer
    by layer on a random-weight layer of `shape`, expert size as converted, batch T: per layer, dense vs what
    SparseMLP runs ("sparse": the kernels cut x as they load it; the down tau vector and the all-on mask of a
    layer that routes nothing are cached; one-token calls select inside the gate/up tiles where
    kernels.routed_select_ok allows it), vs the same call on the select kernel's mask ("mask": SparseMLP before
    commit c0c4a6c) and vs how it ran before the dial-mix round ("before": the input cut, the tau vector and the
    all-on mask built by torch ops every call). Both: the expert mask (router + selection
    where the layer routes), the gate dial, down tau, the compact rule. Summed over the model's layers per
    budget. Gate and up rows are read whole: input skip saves FLOPs here, not bytes."""
    e = mix["expert_size"]
    L, gen, gss = _gate_layer(shape, e)
    dn = [wd.float().norm(dim=0) for (_, _, wd) in L.dense]
    out = {"shape": shape, "expert_size": e, "source": {k: mix.get(k) for k in ("commit", "model", "text")},
           "compact_below": COMPACT_BELOW, "budgets": []}

    def layer_fns(x, tin, routed, thrs, masks, gate_tau, down_tau, tdec, T, frac):
        compact = True if (T == 1 and frac <= COMPACT_BELOW) else None
        ones = torch.ones(T, L.m // e, dtype=torch.bool, device=DEV)
        taus = [(down_tau / n.to(DT).clamp_min(1e-12)) if down_tau > 0 else None for n in dn]

        def sparse(i, before, mask_path=False):
            c = i % L.nc
            kw = {"gate_scale": gss[c] if gate_tau > 0 else None, "gate_tau": gate_tau, "compact": compact,
                  "decide_tau": tdec}
            if before:
                xi = x * (x.abs() >= tin) if tin > 0 else x
                mask = K.route(x, *L.router[c], thrs[c]) if routed else torch.ones(T, L.m // e, dtype=torch.bool,
                                                                                       device=DEV)
                tau = (down_tau / dn[c].to(DT).clamp_min(1e-12)) if down_tau > 0 else None
                return K.sparse_mlp(xi, L.packed[c], None, None, None, mask, tau, "silu", **kw)
            if not routed:
                return K.sparse_mlp(x, L.packed[c], None, None, None, ones, taus[c], "silu", input_tau=tin, **kw)
            if not mask_path and K.routed_select_ok(T, compact, e, L.m // e, gate_tau > 0):
                return K.sparse_mlp(x, L.packed[c], None, None, None, None, taus[c], "silu", input_tau=tin,
                                    logits=K.route_logits(x, *L.router[c]), threshold=thrs[c], **kw)
            return K.sparse_mlp(x, L.packed[c], None, None, None, K.route(x, *L.router[c], thrs[c]), taus[c], "silu",
                                input_tau=tin, **kw)
        return [lambda i: dense_mlp(x, *L.dense[i % L.nc]), lambda i: sparse(i, True), lambda i: sparse(i, False),
                lambda i: sparse(i, False, mask_path=True)]

    for b in mix["budgets"]:
        for T in Ts:
            rows = []
            for li, f in enumerate(b["layers"]):
                case = _dial_case(L, gss, dn, gen, f, T, e)
                fns = layer_fns(*case, T, f["experts"])
                ys = [fn(0).float() for fn in fns[1:]]
                rel = ((ys[1] - ys[0]).norm() / ys[0].norm().clamp_min(1e-30)).item()
                ts = time_graphs(fns, 2 * L.nc, reps=20)
                rows.append({"layer": li, "fractions": f, "dense_us": round(ts[0], 2), "before_us": round(ts[1], 2),
                             "sparse_us": round(ts[2], 2), "mask_us": round(ts[3], 2), "rel_vs_before": rel,
                             "sparse_equals_mask": bool(torch.equal(ys[1], ys[2])),
                             "compact": T == 1 and f["experts"] <= COMPACT_BELOW})
            keys = ("dense_us", "before_us", "sparse_us", "mask_us")
            tot = dict(zip(keys, (sum(r[k] for r in rows) for k in keys)))
            out["budgets"].append({"target": b["target"], "batch": T, "mlp_flops_kept": b["mean"]["mlp_flops_kept"],
                                   **{k: round(v, 1) for k, v in tot.items()},
                                   "speedup": round(tot["dense_us"] / tot["sparse_us"], 3),
                                   "speedup_before": round(tot["dense_us"] / tot["before_us"], 3),
                                   "speedup_mask": round(tot["dense_us"] / tot["mask_us"], 3),
                                   "routed_layers_equal": sum(r["sparse_equals_mask"] for r in rows),
                                   "max_rel_vs_before": max(r["rel_vs_before"] for r in rows), "layers": rows})
            print(f"dial mix {b['target']} T={T}: {len(rows)} layers, dense {tot['dense_us']:.0f} us, before "
                  f"{tot['before_us']:.0f} ({tot['dense_us'] / tot['before_us']:.2f}x), sparse "
                  f"{tot['sparse_us']:.0f} ({tot['dense_us'] / tot['sparse_us']:.2f}x), mask {tot['mask_us']:.0f}",
                  flush=True)
    del L
    torch.cuda.empty_cache()
    return out


def crossover_summary(rows, min_gain=0.02):
    """Per expert size: mean over rounds per fraction, and the largest fraction up to which compact wins by
    >= min_gain at every fraction (with and without the dial)."""
    out = {}
    for e in sorted({r["expert_size"] for r in rows}):
        per = {}
        for r in rows:
            if r["expert_size"] == e:
                per.setdefault(r["target_frac"], []).append(r)
        table = []
        for f in sorted(per):
            rs = per[f]

            def mean(k, rs=rs):
                return round(sum(r[k] for r in rs) / len(rs), 4 if k == "expert_frac" else 2)
            table.append({"target_frac": f, "expert_frac": mean("expert_frac"), "old_us": mean("old_us"),
                          "compact_us": mean("compact_us"), "dial_old_us": mean("dial_old_us"),
                          "dial_compact_us": mean("dial_compact_us"), "mlp_old_us": mean("mlp_old_us"),
                          "mlp_compact_us": mean("mlp_compact_us"),
                          "expert_frac_copies": rs[0]["expert_frac_copies"] if "expert_frac_copies" in rs[0] else None,
                          "gain_min": min(r["gain"] for r in rs), "gain_max": max(r["gain"] for r in rs),
                          "dial_gain_min": min(r["dial_gain"] for r in rs),
                          "dial_gain_max": max(r["dial_gain"] for r in rs)})
        table.sort(key=lambda t: t["expert_frac"])
        res = {"table": table}
        # the largest measured fraction up to which every measured point wins by >= min_gain in every round
        for key, gk in (("largest_win", "gain_min"), ("largest_win_dial", "dial_gain_min")):
            best = None
            for t in table:
                if t[gk] >= min_gain:
                    best = t["expert_frac"]
                else:
                    break
            res[key] = best
        out[str(e)] = res
    return out


def print_compact(res):
    print("\n=== compacted vs old Triton decode path, llama3-8b (us per call; full = router + MLP) ===")
    print("  e  T kept  union | dense | full old  compact | MLP old compact sep.kernel | ideal  floor | compaction")
    for r in res.get("compact", []):
        print(f"{r['expert_size']:3d} {r['batch']:2d} {r['kept']:.2f} {r['union_frac']:.3f} | {r['dense_us']:6.1f} | "
              f"{r['old_us']:6.1f} {r['compact_us']:7.1f} | {r['mlp_old_us']:6.1f} {r['mlp_compact_us']:6.1f} "
              f"{r.get('mlp_compact_sep_kernel_us', float('nan')):6.1f} | {r['ideal_us']:6.1f} "
              f"{r['floor_mlp_us']:6.1f} "
              f"| {r['compaction_kernel_us']:5.1f}")
    for r in res.get("compact_dial", []):
        print(f"dial e={r['expert_size']} T={r['batch']}: full old {r['old_us']} compact {r['compact_us']} | MLP old "
              f"{r['mlp_old_us']} compact {r['mlp_compact_us']}")


def print_gate_dial(rows):
    print("\n=== gate dial, llama3-8b layer (us; sparse = router + MLP; default tile first) ===")
    for r in rows:
        print(f"e={r['expert_size']} T={r['batch']}: experts {r['experts_kept']:.3f}, up rows "
              f"{r['up_rows_kept_of_selected']:.3f}"
              f" of selected, MLP FLOPs {r['kept_flops_frac']:.3f} (no dial {r['kept_flops_frac_nodial']:.3f}) | dense "
              f"{r['dense_us']} sparse {r['sparse_us']} ({r['default_tile']}) x{r['speedup_vs_dense']:.2f} | no dial "
              f"{r['sparse_nodial_us']} (dial x{r['speedup_vs_nodial']:.2f}) | two-phase "
              f"{r['sparse_two_phase_us']} fused {r['sparse_fused_us']} | MLP alone: no dial {r['mlp_nodial_us']} "
              f"two-phase {r['mlp_two_phase_us']} fused "
              f"{r['mlp_fused_us']} floor {r.get('floor_mlp_us')}")


def print_table(res):
    co = res.get("crossover")
    if co:
        print(f"\n=== crossover (llama3-8b e={co['expert_size']}, router {co['router']}): sparse beats dense up to "
              f"T={co['dense_above_tokens']}; runtime.DENSE_ABOVE_TOKENS = {res['dense_above_tokens']} ===")
        for r in co["rows"]:
            print(f"  kept {r['kept']} T={r['batch']:<2d} dense {r['dense_us']:6.1f} triton {r['triton_us']:6.1f} "
                  f"dense-masked {r['dense_masked_us']:6.1f} union {r['union_frac']:.2f} x{r['best_speedup']:.2f}")
    for r in res.get("router", []):
        print(f"router e={r['expert_size']} T={r['batch']}: {r['router_us']} us ({r['router_mode']}; three "
              f"{r.get('router_three_us')}, r2sel {r.get('router_r2sel_us')}, persistent "
              f"{r.get('router_persistent_us')})")
    print("\n=== llama3-8b MLP layer, bf16: speedup dense/sparse (sparse = router + selection + MLP) ===")
    mlp = [r for r in res["mlp"] if r["shape"] == "llama3-8b"]
    es = sorted({r["expert_size"] for r in mlp})
    for kept in (0.5, 0.25):
        print(f"kept {kept}:  " + "  ".join(f"e={e:<4d}" for e in es))
        for T in sorted({r["batch"] for r in mlp}):
            cells = []
            for e in es:
                rr = [r for r in mlp if r["expert_size"] == e and r["batch"] == T and r["kept"] == kept]
                cells.append(f"{rr[0]['dense_us'] / rr[0]['sparse_us']:6.2f}" if rr else "   n/a")
            print(f"  T={T:<3d}     " + "  ".join(cells))
    b1 = [r for r in mlp if r["batch"] == 1]
    if b1:
        print("batch 1 detail (us): e kept dense sparse ideal router router% floor GB/s mlp-only")
        for r in b1:
            if r["kept"] in (0.5, 0.25):
                print(f"  {r['expert_size']:4d} {r['kept']:.2f} {r['dense_us']:7.1f} {r['sparse_us']:7.1f} "
                      f"{r['ideal_us']:7.1f} {r['router_us']:5.1f} {100 * r['router_us'] / r['sparse_us']:5.1f}% "
                      f"{r['floor_us']:6.1f} {r['gbps']:7.0f} {r['sparse_us'] - r['router_us']:7.1f}")
    for r in res.get("prefill_layer", []):
        print(f"prefill layer {r['shape']} e={r['expert_size']} kept {r['kept']} T={r['tokens']}: dense "
              f"{r['dense_us']} "
              f"sparse {r['sparse_us']} ({r['path']}) ratio {r['dense_us'] / r['sparse_us']:.3f} (router + masked "
              f"{r['router_masked_mlp_us']}, router {r['router_us']})")
    if res.get("gate_dial"):
        print_gate_dial(res["gate_dial"])
    for r in res.get("down_det", []):
        print(f"down kernel kept {r['kept']} T={r['batch']}: atomics {r['atomic_us']} us, fixed-order "
              f"{r['deterministic_us']} us (router + MLP, e=8)")
    for c in res.get("e2e", {}).get("kv_check", []):
        for key in ("eager_repeat_atomic", "eager_repeat_deterministic"):
            er = c.get(key)
            if isinstance(er, str):
                print(f"e2e kept {c['kept']} B={c['batch']}: {key} failed: {er}")
            elif er:
                print(f"e2e kept {c['kept']} B={c['batch']} {key}: graph vs eager {c['graph_vs_eager_rel_err']}, "
                      f"eager vs eager {er['logits_rel']}, first layer out differs {er['first_layer_out_differs']}, "
                      f"first mask differs {er['first_layer_mask_differs']}, layer-0 repeat {er['layer0_repeat']}")
    if res.get("kv_cache"):
        print(f"e2e decode KV cache: {res['kv_cache']}")
    for r in res.get("decode", []):
        print(f"e2e decode kept {r['kept']} B={r['batch']}: dense {r['dense_tok_s']} tok/s sparse {r['sparse_tok_s']} "
              "tok/s ratio "
              f"{r['sparse_tok_s'] / r['dense_tok_s'] if r['dense_tok_s'] and r['sparse_tok_s'] else 'n/a'}")
    for r in res.get("decode_compiled", []):
        print(f"e2e decode, torch.compile, kept {r['kept']} B={r['batch']}: dense {r['dense_tok_s']} tok/s sparse "
              f"{r['sparse_tok_s']} tok/s ratio {r['speedup']}")
    for r in res.get("profile_layer", []):
        print(f"layer profile kept {r['target']} (compact {r['compact']}): graph {r['graph_us']} us = kernels "
              f"{r['kernels_sum_us']} {r['kernels_us']} + gaps {r['gaps_us']}; dense {r['dense_us']}")
    for r in res.get("prefill", []):
        print(f"e2e prefill kept {r['kept']} T={r['tokens']}: dense {r['dense_ms']} ms sparse {r['sparse_ms']} ms "
              f"ratio {r['dense_ms'] / r['sparse_ms']:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-trials", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--final", action="store_true")
    ap.add_argument("--note", default="", help="free text stored under 'note' (which run, what it is for)")
    ap.add_argument("--gate-dial-only", action="store_true",
                    help="run bench_gate_dial alone and merge its key into the existing record at --out")
    ap.add_argument("--gate-dial-tiles", action="store_true", help="with --gate-dial-only: gate_dial_tiles() first")
    ap.add_argument("--compact-only", action="store_true",
                    help="old vs compacted decode path alone (compact_trials unless --no-trials, bench_compact, "
                         "bench_compact_dial); --quick: e=8 only, fewer tiles")
    ap.add_argument("--compact-crossover", action="store_true",
                    help="bench_compact_crossover alone; merged as key compact_crossover into the record at --out "
                         "(created if absent)")
    ap.add_argument("--fracs", default="0.2,0.25,0.3,0.35,0.4,0.45,0.5", help="--compact-crossover fractions")
    ap.add_argument("--rounds", type=int, default=2, help="--compact-crossover passes")
    ap.add_argument("--e2e-only", action="store_true",
                    help="bench_e2e alone (the defaults, runtime.COMPACT_BELOW active) into a new record at --out")
    ap.add_argument("--compile", default="",
                    help="also time end-to-end decode with the model torch.compile'd at these batches "
                         "(comma-separated, e.g. 1,4), dense and sparse alike (decode_compiled)")
    ap.add_argument("--profile-layer", action="store_true",
                    help="select_trials() and profile_layer() (per-kernel times of a batch-1 layer vs its graph)")
    ap.add_argument("--down-trials", action="store_true",
                    help="down_trials() alone (the down kernel's grid varied, a batch-1 layer) into a new record")
    ap.add_argument("--down-cfgs", default=None,
                    help="JSON list of kernel CONFIG overrides --down-trials times in both of its cases (the first "
                         "should be {}: outputs are compared with it), e.g. '[{}, {\"dn_BD\": 512, \"dn_BN\": 16}]'")
    ap.add_argument("--decide-trials", action="store_true",
                    help="decide_trials() alone (early decisions on vs off, a layer at batch 1 and 2) into a new "
                         "record")
    ap.add_argument("--decide-cfgs", default="{}",
                    help="JSON list of kernel CONFIG overrides the deciding variants of --decide-trials are also "
                         "timed with, e.g. '[{}, {\"gd_BN\": 32}]'")
    ap.add_argument("--routed-trials", action="store_true",
                    help="routed_trials() alone (selection in the gate/up tiles vs the select kernel's mask) into a "
                         "new record")
    ap.add_argument("--sweep", action="store_true",
                    help="the MLP layer alone over issue 4's whole grid (every shape, expert sizes "
                         f"{'/'.join(map(str, SWEEP_E))}, kept {'/'.join(map(str, SWEEP_KEPT))}, batch "
                         f"{'/'.join(map(str, SWEEP_T))}) into a new record; saved after each shape")
    ap.add_argument("--shapes", default=None, help=f"--sweep: comma-separated shapes of {', '.join(SHAPES)}")
    ap.add_argument("--expert-sizes", default=None, help="--sweep: comma-separated expert sizes")
    ap.add_argument("--batches", default=None, help="--sweep: comma-separated tokens per call")
    ap.add_argument("--dial-mix", default=None,
                    help="a bench/dial_mix.py record: bench_dial_mix alone into a new record at --out")
    a = ap.parse_args(argv)
    compiled = tuple(int(b) for b in a.compile.split(",")) if a.compile else ()

    if a.dial_mix:
        t0 = time.time()
        with open(a.dial_mix) as f:
            mix = json.load(f)
        res = {**run_info(a.note), "dial_mix": bench_dial_mix(mix, Ts=(1, 2))}
        write_record(res, a.out, t0)
        for b in res["dial_mix"]["budgets"]:
            print({k: v for k, v in b.items() if k != "layers"})
        return

    if a.sweep:
        from densesparse.config import ConvertConfig
        t0 = time.time()
        res = {**run_info(a.note), "default_expert_size": ConvertConfig().expert_size, "config": dict(K.CONFIG),
               "decode_max_t": K.DECODE_MAX_T, "dense_above_tokens": DENSE_ABOVE,
               "copy_gbps": round(copy_bandwidth(), 1), "mlp": []}
        shapes = a.shapes.split(",") if a.shapes else SWEEP_SHAPES
        es = tuple(int(e) for e in a.expert_sizes.split(",")) if a.expert_sizes else SWEEP_E
        batches = tuple(int(t) for t in a.batches.split(",")) if a.batches else SWEEP_T
        for shape in shapes:
            res["mlp"] += bench_mlp([shape], es, SWEEP_KEPT, batches, res["copy_gbps"])
            write_record(res, a.out, t0)
        print("\n" + sweep_table(res))
        return

    if a.compact_crossover:
        from densesparse import runtime
        res = {}
        if os.path.exists(a.out):
            with open(a.out) as f:
                res = json.load(f)
        t0 = time.time()
        rows = bench_compact_crossover(fracs=tuple(float(f) for f in a.fracs.split(",")), rounds=a.rounds)
        prev = res.get("compact_crossover")
        res["compact_crossover"] = {
            **run_info(a.note),
            "config": {k: v for k, v in K.CONFIG.items()}, "compact_below_at_run": runtime.COMPACT_BELOW,
            "summary": crossover_summary(rows), "rows": rows, "wall_s": round(time.time() - t0, 1)}
        if prev:  # earlier sweeps stay, newest last
            res["compact_crossover"]["earlier_runs"] = prev.pop("earlier_runs", []) + [prev]
        write_record(res, a.out)
        print(json.dumps(res["compact_crossover"]["summary"], indent=1))
        return

    if a.routed_trials:
        t0 = time.time()
        res = {**run_info(a.note), "config": dict(K.CONFIG), "routed_trials": routed_trials()}
        write_record(res, a.out, t0)
        for r in res["routed_trials"]:
            print({k: v for k, v in r.items() if k != "kernels_us"})
        return
    if a.decide_trials:
        cfgs = json.loads(a.decide_cfgs)
        res = {**run_info(a.note), "config": dict(K.CONFIG),
               "decide_trials": decide_trials(cfgs=tuple(cfgs) if isinstance(cfgs, list) else (cfgs,))}
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    if a.down_trials:
        cases = None
        if a.down_cfgs:
            cfgs = tuple(json.loads(a.down_cfgs))
            cases = ((0.5, False, cfgs), (0.25, True, cfgs))
        res = {**run_info(a.note), "config": dict(K.CONFIG),
               "down_trials": down_trials(cases=cases) if cases else down_trials()}
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    if a.e2e_only:
        from densesparse import runtime
        from densesparse.config import ConvertConfig
        t0 = time.time()
        res = {**run_info(a.note), "config": dict(K.CONFIG), "compact_below": runtime.COMPACT_BELOW,
               "dense_above_tokens": DENSE_ABOVE, "default_expert_size": ConvertConfig().expert_size}
        if a.profile_layer:
            res["select_trials"] = select_trials()
            res["config"] = dict(K.CONFIG)
            res["profile_layer"] = profile_layer()
        try:
            e2e = bench_e2e(E=res["default_expert_size"], compiled_batches=compiled)
            res["decode"], res["prefill"] = e2e.pop("decode"), e2e.pop("prefill")
            res["decode_compiled"] = e2e.pop("decode_compiled", [])
            res["e2e"] = e2e
        except Exception as ex:
            import traceback
            traceback.print_exc()
            res["e2e_error"] = f"{type(ex).__name__}: {str(ex)[:500]}"
        write_record(res, a.out, t0)
        for r in res.get("decode", []) + res.get("decode_compiled", []):
            print(r)
        for r in res.get("prefill", []):
            print(r)
        return

    if a.compact_only:
        t0 = time.time()
        res = run_info(a.note)

        def save_c():
            write_record(res, a.out, t0)
        res["copy_gbps"] = round(copy_bandwidth(), 1)
        res["config_default"] = dict(K.CONFIG)
        if not a.no_trials:
            res["compact_trials"] = compact_trials(quick=a.quick)
            save_c()
        res["config"] = dict(K.CONFIG)
        res["compact_profile"] = profile_compact()
        save_c()
        res["compact"] = bench_compact(res["copy_gbps"], es=(8,) if a.quick else (8, 16, 32))
        save_c()
        res["compact_dial"] = bench_compact_dial()
        save_c()
        print(f"wall {res['wall_s']} s")
        print_compact(res)
        return

    if a.gate_dial_only:
        with open(a.out) as f:
            res = json.load(f)
        t0 = time.time()
        if a.gate_dial_tiles:
            res["gate_dial_tiles"] = gate_dial_tiles()
        res["gate_dial"] = bench_gate_dial(res.get("copy_gbps"))
        res["gate_dial_run"] = {**run_info(a.note), "wall_s": round(time.time() - t0, 1)}
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print_gate_dial(res["gate_dial"])
        return

    from densesparse.config import ConvertConfig
    t0 = time.time()
    res = {**run_info(a.note), "default_expert_size": ConvertConfig().expert_size, "mlp": [], "prefill_layer": [],
           "decode": [], "prefill": []}

    def save():
        write_record(res, a.out, t0)

    def run_e2e():
        if a.no_e2e:
            return
        try:
            e2e = bench_e2e(E=res["default_expert_size"], compiled_batches=compiled)
            res["decode"], res["prefill"] = e2e.pop("decode"), e2e.pop("prefill")
            res["decode_compiled"] = e2e.pop("decode_compiled", [])
            res["e2e"] = e2e
            res["kv_cache"] = e2e["kv_cache"]
        except Exception as ex:
            import traceback
            traceback.print_exc()
            res["e2e_error"] = f"{type(ex).__name__}: {str(ex)[:500]}"
        save()

    if not a.skip_check:
        res["correctness_worst_rel_err"] = check_correctness()
    res["copy_gbps"] = round(copy_bandwidth(), 1)
    if not a.no_trials:
        res["tile_trials"] = tile_trials()
        save()
    res["config"] = dict(K.CONFIG)
    res["decode_max_t"] = K.DECODE_MAX_T
    res["dense_above_tokens"] = DENSE_ABOVE
    res["router"] = bench_router(es=(8,) if a.final else (8, 32))
    save()
    if a.profile_layer:
        res["select_trials"] = select_trials()
        res["profile_layer"] = profile_layer()
        save()
    res["crossover"] = bench_crossover()
    save()
    res["down_det"] = bench_down_det()
    save()
    res["gate_dial"] = bench_gate_dial(res["copy_gbps"])
    save()
    if a.quick:
        plan = [("llama3-8b", [8, 32], [0.5, 0.25], [1, 4, 16])]
    else:
        plan = [("llama3-8b", [8, 16, 32, 128], [0.5, 0.25, 0.75, 0.35], [1, 2, 4, 16]),
                ("llama2-7b", [8, 32], [0.5, 0.25], [1, 16]),
                ("smollm2-135m", [8, 32], [0.5, 0.25], [1, 16])]
    if a.final:  # run 2: the device budget left; run 1 (bench/results/gpu-h100-run1.json) holds the full sweep
        plan = [("llama3-8b", [8, 16, 32], [0.5, 0.25], [1, 4, 16])]
    for i, (shape, es, kepts, batches) in enumerate(plan):
        res["mlp"] += bench_mlp([shape], es, kepts, batches, res["copy_gbps"])
        save()
        if i == 0:
            res["prefill_layer"] = bench_prefill(["llama3-8b"] if a.final else ["llama3-8b", "llama2-7b"],
                                                 [0.5, 0.25])
            save()
            run_e2e()
    if not plan:
        run_e2e()
    save()
    print(f"wall {res['wall_s']} s")
    print_table(res)


if __name__ == "__main__":
    main()
