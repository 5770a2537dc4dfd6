"""Perplexity and FLOPs of a sparse model at several budgets, counted from the real per-token selections."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from densesparse.data import adds_bos, read_text, tokenize, windows
from densesparse.flops import attention_macs, mlp_macs_dense, mlp_macs_sparse, non_mlp_macs
from densesparse.runtime import LayerStats, SparseMLP, apply_budget, sparse_function, sparse_mlps


@torch.no_grad()
def nll_sum(model, wins: list[torch.Tensor], bos: bool) -> tuple[float, int]:
    """Summed negative log-likelihood and number of predicted tokens (a prepended BOS is context, not a target)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in wins:
        ids = ids.to(device)
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
        count += ids.numel() - 1
    return total, count


@torch.no_grad()
def _timed_pass(model, wins) -> float:
    """Seconds for one forward pass over the windows on the GPU, after a warm-up, stats off (the real speed)."""
    device = next(model.parameters()).device
    model(input_ids=wins[0][None].to(device), use_cache=False)
    torch.cuda.synchronize()
    start = time.time()
    for ids in wins:
        model(input_ids=ids[None].to(device), use_cache=False)
    torch.cuda.synchronize()
    return time.time() - start


def _quantile_from_hist(hist: torch.Tensor, q: float) -> int:
    cdf = hist.cumsum(0).double() / max(int(hist.sum()), 1)
    return int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))


def _mlp_macs(mlps: list[SparseMLP], stats: list[LayerStats] | None) -> float:
    total = 0.0
    for i, m in enumerate(mlps):
        if stats is None:
            total += mlp_macs_dense(m.hidden, m.intermediate, m.gated)
            continue
        s = stats[i]
        n = max(s.tokens, 1)
        total += mlp_macs_sparse(m.hidden, s.gate_cells / n if m.gated else 0.0, s.up_cells / n,
                                 s.down_neurons / n, m.router.macs() * s.routed_tokens / n)
    return total


def evaluate_windows(model, wins: list[torch.Tensor], bos: bool, budgets: list[float], budget_table: list[dict],
                     progress=None) -> dict:
    """Perplexity and FLOPs at each budget (the model is left at the dense budget). Perplexity of the sparse
    function: on CUDA no layer takes the dense MLP while it runs (runtime.sparse_function). tokens/s (CUDA only) is
    timed as the model runs when deployed: many-token calls and layers too small for the kernels take the dense
    MLP, as in `generate`."""
    return _evaluate(model, sparse_mlps(model), wins, bos, budgets, budget_table, progress)


def _evaluate(model, mlps, wins, bos, budgets, budget_table, progress) -> dict:
    context = sum((w.numel() + 1) / 2 for w in wins) / max(len(wins), 1)
    other = non_mlp_macs(model, mlps) + attention_macs(model.config, context)
    dense_mlp = _mlp_macs(mlps, None)
    rows = []
    task = progress.add_task("evaluating budgets", total=len(budgets)) if progress else None
    for target in budgets:
        apply_budget(mlps, budget_table, target)
        stats = None if all(m.dense for m in mlps) else [LayerStats(m.n_experts) for m in mlps]
        for m, s in zip(mlps, stats or [None] * len(mlps)):
            m.stats = s
        try:
            with sparse_function(mlps):
                total, count = nll_sum(model, wins, bos)
        finally:
            for m in mlps:
                m.stats = None
        seconds = _timed_pass(model, wins) if next(model.parameters()).is_cuda else None
        mlp = _mlp_macs(mlps, stats)
        row = {
            "target": target,
            "ppl": math.exp(total / count),
            "mlp_flops_per_token": mlp,
            "total_flops_per_token": mlp + other,
            "mlp_flops_kept": mlp / dense_mlp,
            "total_flops_kept": (mlp + other) / (dense_mlp + other),
        }
        if seconds is not None:
            row["tokens_per_s"] = round(sum(w.numel() for w in wins) / seconds, 1)
        if stats is not None:
            per_layer = [{"mean": s.experts / max(s.tokens, 1), "p50": _quantile_from_hist(s.hist, 0.5),
                          "p95": _quantile_from_hist(s.hist, 0.95), "of": m.n_experts} for s, m in zip(stats, mlps)]
            row["experts_per_token"] = {
                "mean": sum(p["mean"] for p in per_layer) / len(per_layer),
                "p50": sorted(p["p50"] for p in per_layer)[len(per_layer) // 2],
                "p95": max(p["p95"] for p in per_layer),
                "per_layer": per_layer,
            }
        else:
            row["experts_per_token"] = {"mean": float(mlps[0].n_experts), "p50": mlps[0].n_experts,
                                        "p95": mlps[0].n_experts, "per_layer": None}
        rows.append(row)
        if progress:
            progress.advance(task)
    apply_budget(mlps, budget_table, 1.0)
    return {"dense": {"ppl": None, "mlp_flops_per_token": dense_mlp, "total_flops_per_token": dense_mlp + other},
            "rows": rows}


def quality_budget(model, wins: list[torch.Tensor], bos: bool, budget_table: list[dict], max_increase: float
                   ) -> dict:
    """The smallest calibrated budget whose perplexity on `wins` is at most (1 + max_increase) x dense: bisection
    over the budget grid, since perplexity grows as the budget shrinks."""
    mlps = sparse_mlps(model)

    def ppl(target: float) -> float:
        apply_budget(mlps, budget_table, target)
        total, count = nll_sum(model, wins, bos)
        return math.exp(total / count)

    grid = sorted(b["target"] for b in budget_table)
    measured = {}
    lo, hi = 0, len(grid)  # the answer's index; len(grid) = only the dense model passes
    with sparse_function(mlps):
        dense = ppl(1.0)
        while lo < hi:
            mid = (lo + hi) // 2
            measured[grid[mid]] = ppl(grid[mid])
            if measured[grid[mid]] <= dense * (1 + max_increase):
                hi = mid
            else:
                lo = mid + 1
    apply_budget(mlps, budget_table, 1.0)
    return {"max_ppl_increase": max_increase, "mlp_flops": grid[lo] if lo < len(grid) else 1.0,
            "dense_ppl": dense, "tokens": sum(w.numel() - 1 for w in wins),
            "measured": [{"target": t, "ppl": p} for t, p in sorted(measured.items())]}


def evaluate(model_dir: str | Path, data: list[str] | None, budgets: list[float], max_tokens: int | None = None,
             seq_len: int = 1024, progress=None, device: str = "cpu") -> dict:
    """The report of `densesparse eval` (stable keys: model, data, tokens, dense, budgets)."""
    from densesparse.io import load, load_tokenizer

    if device == "cuda" and not torch.cuda.is_available():
        from densesparse.errors import DenseSparseError

        raise DenseSparseError("--device cuda but no CUDA GPU is visible: use --device cpu")
    model = load(model_dir, mlp_flops=1.0, device=device,
                 dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    tokenizer = load_tokenizer(model_dir)
    text, files = read_text(data)
    bos = adds_bos(tokenizer)
    wins = windows(tokenize(tokenizer, text), seq_len, max_tokens, bos=tokenizer.bos_token_id if bos else None)
    spec = model.config.densesparse
    sweep = sorted(set([1.0] + list(budgets)), reverse=True)
    result = evaluate_windows(model, wins, bos, sweep, spec["budgets"], progress)
    dense_row = next(r for r in result["rows"] if r["target"] == 1.0)
    result["dense"]["ppl"] = dense_row["ppl"]
    report = {
        "model": str(model_dir),
        "source_model": spec.get("source_model"),
        "data": files,
        "tokens": sum(w.numel() - 1 for w in wins),
        "seq_len": seq_len,
        "dense": result["dense"],
        "budgets": [r for r in result["rows"] if r["target"] in budgets],
        "device": str(next(model.parameters()).device),
        "expert_size": spec["expert_size"],
        "n_experts": spec["n_experts"],
        "grouping": spec["grouping"],
    }
    return report
