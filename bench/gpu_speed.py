"""GPU speed of the expert-sparse MLP layer (Triton decode kernels, dense-with-mask prefill) vs dense cuBLAS.

    python3 bench/gpu_speed.py --out $OUT/gpu-h100.json [--sweep] [--quick]

Sections (each a function; main() strings them together, so a section can be added):
  check_correctness()  quick float64-reference checks, fails loudly
  copy_bandwidth()     device-to-device copy, the byte ceiling
  sweep_configs()      (--sweep) a few kernel tile configurations at llama3-8b, picks the fastest
  bench_mlp()          decode layer: dense / sparse (router + selection + sparse MLP) / pre-sliced ideal / router
  bench_prefill()      2048-token layer: dense vs sparse
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

SHAPES = {"llama3-8b": (4096, 14336), "llama2-7b": (4096, 11008), "smollm2-135m": (576, 1536)}
ROUTER_R = {"llama3-8b": 256, "llama2-7b": 256, "smollm2-135m": 128}
L2_BYTES = 50e6
DT = torch.bfloat16
DEV = "cuda"


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------
def time_graph(fn, n_inner, reps=25, warm=3):
    """fn(i) enqueues call i (i picks the weight copy). Captures n_inner calls in one graph; median per call, us."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(n_inner, 2)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_inner):
            fn(i)
    for _ in range(warm):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / n_inner)
    del g
    return statistics.median(ts)


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
        self.packed = [K.pack(wg, wu, wd.t().contiguous(), e, 0) for (wg, wu, wd) in self.dense]
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


def time_sparse(L, x, mask, path, with_router=True, thr=0.5):
    def fn(i):
        if with_router:
            rw1, rb1, rw2, rb2 = L.router[i % L.nc]
            K.route(x, rw1, rb1, rw2, rb2, thr)
        return K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None, "silu", path=path)
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
        for T in batches:
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
                    mask = random_mask(T, n_e, kept, gen)
                    union = mask.any(0).float().mean().item()
                    tri = time_sparse(L, x, mask, "triton") if T <= 16 else None
                    dm = time_sparse(L, x, mask, "dense")
                    auto = time_sparse(L, x, mask, None)
                    bytes_moved = union * 3 * L.m * L.d * 2 + (L.r * L.d + n_e * L.r) * 2
                    rows.append({
                        "shape": shape, "expert_size": e, "kept": kept, "batch": T,
                        "dense_us": round(dense_cache[T], 2), "sparse_us": round(auto, 2),
                        "ideal_us": round(ideal_cache[(T, kept)], 2), "router_us": round(router_us, 2),
                        "gbps": round(bytes_moved / (auto * 1e-6) / 1e9, 1),
                        "triton_us": None if tri is None else round(tri, 2), "dense_masked_us": round(dm, 2),
                        "union_frac": round(union, 4),
                        "floor_us": round(bytes_moved / (copy_gbps * 1e9) * 1e6, 2),
                    })
                    r = rows[-1]
                    print(f"{shape:13s} e={e:<3d} kept={kept:<4} T={T:<2d} dense {r['dense_us']:7.1f} "
                          f"sparse {r['sparse_us']:7.1f} (tri {r['triton_us']}, dm {r['dense_masked_us']}) "
                          f"ideal {r['ideal_us']:7.1f} router {router_us:5.1f} floor {r['floor_us']:6.1f} "
                          f"x{r['dense_us'] / r['sparse_us']:.2f}", flush=True)
        del L
        torch.cuda.empty_cache()
    return rows


def bench_prefill(shapes, kepts, tokens=2048, e=32):
    rows = []
    gen = torch.Generator(device=DEV).manual_seed(2)
    for shape in shapes:
        L = Layer(shape)
        L.pack_for(e)
        x = torch.randn(tokens, L.d, device=DEV, dtype=DT, generator=gen)
        dense = time_graph(lambda i: dense_mlp(x, *L.dense[i % L.nc]), L.nc, reps=10)
        router = time_graph(lambda i: K.route(x, *L.router[i % L.nc], 0.5), L.nc, reps=10)
        for kept in kepts:
            mask = random_mask(tokens, L.m // e, kept, gen)
            mlp_only = time_graph(lambda i: K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None,
                                                         "silu"), L.nc, reps=10)

            def fn(i):
                rw1, rb1, rw2, rb2 = L.router[i % L.nc]
                K.route(x, rw1, rb1, rw2, rb2, 0.5)
                return K.sparse_mlp(x, L.packed[i % L.nc], None, None, None, mask, None, "silu")
            sp = time_graph(fn, L.nc, reps=10)
            rows.append({"shape": shape, "kept": kept, "tokens": tokens, "expert_size": e,
                         "dense_us": round(dense, 1), "sparse_us": round(sp, 1), "router_us": round(router, 1),
                         "masked_mlp_us": round(mlp_only, 1)})
            print(f"prefill {shape} kept={kept} T={tokens}: dense {dense:.1f} sparse {sp:.1f} "
                  f"ratio {dense / sp:.3f} (router {router:.1f}, masked mlp {mlp_only:.1f})", flush=True)
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


def print_table(res):
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
        print("batch 1 detail (us): e kept dense sparse ideal router router% floor GB/s")
        for r in b1:
            if r["kept"] in (0.5, 0.25):
                print(f"  {r['expert_size']:4d} {r['kept']:.2f} {r['dense_us']:7.1f} {r['sparse_us']:7.1f} "
                      f"{r['ideal_us']:7.1f} {r['router_us']:5.1f} {100 * r['router_us'] / r['sparse_us']:5.1f}% "
                      f"{r['floor_us']:6.1f} {r['gbps']:7.0f}")
    for r in res["prefill_layer"]:
        print(f"prefill {r['shape']} kept {r['kept']} T={r['tokens']}: dense {r['dense_us']} sparse {r['sparse_us']}"
              f" ratio {r['dense_us'] / r['sparse_us']:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--profile-only", action="store_true")
    a = ap.parse_args(argv)
    import triton
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "default_expert_size": None, "mlp": [], "prefill_layer": []}

    def save():
        res["wall_s"] = round(time.time() - t0, 1)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    if a.profile_only:
        res["profile"] = profile_kernels()
        save()
        return
    if not a.skip_check:
        res["correctness_worst_rel_err"] = check_correctness()
    res["copy_gbps"] = round(copy_bandwidth(), 1)
    if a.sweep:
        L = Layer("llama3-8b")
        res["sweep"] = sweep_configs(L)
        del L
        torch.cuda.empty_cache()
        save()
    res["config"] = dict(K.CONFIG)
    res["decode_max_t"] = K.DECODE_MAX_T
    if a.quick:
        shapes, es, kepts = ["llama3-8b"], [8, 32, 128], [0.5, 0.25]
    else:
        shapes, es, kepts = list(SHAPES), [1, 4, 8, 16, 32, 128], [0.75, 0.5, 0.35, 0.25]
    for i, shape in enumerate(shapes):
        res["mlp"] += bench_mlp([shape], es, kepts, [1, 4, 16], res["copy_gbps"])
        save()
        if i == 0:
            res["prefill_layer"] = bench_prefill(["llama3-8b", "llama2-7b"], [0.5, 0.25])
            save()
    print_table(res)


if __name__ == "__main__":
    main()
