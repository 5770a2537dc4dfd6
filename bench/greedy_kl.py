"""Experiment, not in the product: refine one budget's per-layer allocation greedily on the whole model's KL.

    python bench/greedy_kl.py --sparse DIR [--target 0.5] [--rounds 5] [--windows 16]

`convert` allocates the budget across layers with each layer's output error, weighted by the loss probe (each layer
alone sparse). This measures what is left when the allocation is searched on the real objective with every layer
sparse at once: each layer may take its own settings from any calibrated budget row of the spec (its dials and bias
row, as `apply_budget` sets them). A round measures, for every layer, the KL(dense || sparse) on held-out
calibration tokens with that layer one row denser and one row sparser; it then moves the layers with the largest
KL drop per multiply-add one row denser, paid for by the cheapest sparser moves, and keeps the exchange if the
KL falls. Multiply-adds per layer and row come from one counted forward per row. The search sees only calibration
windows the conversion did not sample; a second, disjoint set checks it; WikiText is evaluated once at the start
and once at the end, never searched on.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import git_commit, load_conversion, unsampled_windows, wt2_windows

from densesparse import __version__
from densesparse.budget import kl_per_token, reference
from densesparse.evaluate import _mlp_macs, nll_sum
from densesparse.report import write_json
from densesparse.runtime import LayerStats, apply_budget, sparse_mlps


def layer_view(budgets: list[dict], i: int) -> list[dict]:
    """The spec's budget rows seen by layer i alone (apply_budget on a one-layer list)."""
    return [{k: ([v[i]] if isinstance(v, list) else v) for k, v in b.items()} for b in budgets]


class Allocation:
    def __init__(self, model, mlps, budgets, grid):
        self.model, self.mlps, self.grid = model, mlps, grid
        self.views = [layer_view(budgets, i) for i in range(len(mlps))]

    def set(self, idx: list[int]) -> None:
        for m, view, k in zip(self.mlps, self.views, idx):
            apply_budget([m], view, self.grid[k])

    def kl(self, idx, wins, dense) -> float:
        self.set(idx)
        return kl_per_token(self.model, wins, dense)

    def counted(self, idx, wins, bos: bool = False) -> tuple[list[float], float, float]:
        """One pass over wins at idx, counted: per-layer multiply-adds per token, the MLP FLOPs kept and the PPL."""
        self.set(idx)
        stats = [LayerStats(m.n_experts) for m in self.mlps]
        for m, s in zip(self.mlps, stats):
            m.stats = s
        try:
            total, count = nll_sum(self.model, wins, bos)
        finally:
            for m in self.mlps:
                m.stats = None
        per = [_mlp_macs([m], [s]) for m, s in zip(self.mlps, stats)]
        return per, sum(per) / _mlp_macs(self.mlps, None), math.exp(total / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", required=True)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--moves", type=int, default=3, help="layers moved denser per round at most")
    ap.add_argument("--search-tokens", type=int, default=1024)
    ap.add_argument("--check-tokens", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows (wt2-64k cut), start and end only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "greedy-kl-smollm2.json"))
    args = ap.parse_args()
    started, commit = time.time(), git_commit()
    torch.set_grad_enabled(False)
    model, tok, spec = load_conversion(args.sparse)
    held = unsampled_windows(tok, spec, args.search_tokens + args.check_tokens)
    n_search = max(1, args.search_tokens // spec["calibration"]["seq_len"])
    search, check = held[:n_search], held[n_search:]
    mlps = sparse_mlps(model)
    budgets = spec["budgets"]
    grid = sorted(b["target"] for b in budgets) + [1.0]
    start = grid.index(min(grid, key=lambda t: abs(t - args.target)))
    alloc = Allocation(model, mlps, budgets, grid)
    apply_budget(mlps, budgets, 1.0)
    dense_s = [reference(model, w) for w in search]
    dense_c = [reference(model, w) for w in check]
    table = []  # table[k][i]: layer i's multiply-adds per token at grid row k (every layer at row k)
    for k in range(len(grid)):
        table.append(alloc.counted([k] * len(mlps), search)[0])
        print(f"macs row {grid[k]}: {sum(table[-1]):.3e}", flush=True)
    budget_macs = sum(table[start])
    idx = [start] * len(mlps)
    kl0 = alloc.kl(idx, search, dense_s)
    history = [{"round": 0, "kl_search": round(kl0, 5), "rows": [grid[k] for k in idx]}]
    print(f"start kl {kl0:.5f}", flush=True)
    n = len(mlps)
    for r in range(1, args.rounds + 1):
        gain, cost = [], []
        for i in range(n):
            for step, out in ((1, gain), (-1, cost)):
                k = idx[i] + step
                if not 0 <= k < len(grid):
                    continue
                trial = list(idx)
                trial[i] = k
                d_macs = table[k][i] - table[idx[i]][i]
                if abs(d_macs) < 1e-9:
                    continue
                d_kl = alloc.kl(trial, search, dense_s) - kl0
                out.append(((-d_kl / d_macs) if step == 1 else (d_kl / -d_macs), i, k, d_macs, d_kl))
        gain.sort(reverse=True)
        cost.sort()
        accepted = False
        for moves in range(min(args.moves, len(gain)), 0, -1):
            trial, spent, used = list(idx), 0.0, set()
            for _, i, k, d_macs, _ in gain[:moves]:
                trial[i], spent = k, spent + d_macs
                used.add(i)
            for _, j, k, d_macs, _ in cost:
                if spent <= 0:
                    break
                if j in used:
                    continue
                trial[j], spent = k, spent + d_macs
                used.add(j)
            if spent > 0 or sum(table[trial[i]][i] for i in range(n)) > budget_macs * 1.002:
                continue
            kl = alloc.kl(trial, search, dense_s)
            if kl < kl0:
                idx, kl0, accepted = trial, kl, True
                break
        history.append({"round": r, "kl_search": round(kl0, 5), "accepted": accepted,
                        "rows": [grid[k] for k in idx]})
        print(f"round {r}: kl {kl0:.5f} accepted {accepted}", flush=True)
        if not accepted:
            break
    result = {}
    wins, bos = wt2_windows(tok, args.windows)
    for name, rows in (("start", [start] * n), ("greedy", idx)):
        kl_check = alloc.kl(rows, check, dense_c)
        _, kept, _ = alloc.counted(rows, check)
        _, wt_kept, wt_ppl = alloc.counted(rows, wins, bos)
        result[name] = {"kl_search": history[0]["kl_search"] if name == "start" else round(kl0, 5),
                        "kl_check": round(kl_check, 5), "mlp_flops_kept_check": round(kept, 4),
                        "wikitext": {"ppl": round(wt_ppl, 4), "mlp_flops_kept": round(wt_kept, 4)},
                        "rows": [grid[k] for k in rows]}
        print(name, result[name], flush=True)
    write_json({"what": __doc__.splitlines()[0], "sparse": args.sparse, "target": args.target,
                "search_tokens": sum(w.numel() for w in search), "check_tokens": sum(w.numel() for w in check),
                "protocol": f"wt2-64k cut to its first {args.windows} windows (start and end only)",
                "command": "python " + " ".join(sys.argv), "commit": commit,
                "versions": {"densesparse": __version__, "torch": torch.__version__,
                             "python": platform.python_version()},
                "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                "seconds": round(time.time() - started, 1), "history": history, "result": result}, args.out)


if __name__ == "__main__":
    main()
