"""Experiment, not in the product: a low-rank linear correction of each layer's sparse-MLP output error.

    python bench/error_correction.py --sparse DIR [--ranks 8,32] [--targets 0.5,0.35,0.25] [--fit-tokens 4096]

Per layer and budget, the error left by the sparse MLP (dense minus sparse output, with the model's own bias
correction applied) is regressed on the centred MLP input: ridge, then cut to rank r, y += (x - mean x) U V at
2 * d * r multiply-adds per token. Fitted on dense-model inputs from the default calibration corpus (never the
evaluation text), evaluated on WikiText windows. The correction's multiply-adds are added to the measured MLP
FLOPs, and the same conversion without it is also evaluated at that larger budget, so rows compare at equal FLOPs.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import WT2, git_commit, wt2_windows  # noqa: E402

from densesparse import __version__  # noqa: E402
from densesparse.arch import resolve_layout  # noqa: E402
from densesparse.data import calibration_windows  # noqa: E402
from densesparse.evaluate import evaluate_windows  # noqa: E402
from densesparse.flops import mlp_macs_dense  # noqa: E402
from densesparse.io import load, load_tokenizer, read_spec  # noqa: E402
from densesparse.report import write_json  # noqa: E402
from densesparse.runtime import SparseMLP, apply_budget, sparse_mlps  # noqa: E402
from densesparse.stats import collect  # noqa: E402

RIDGE = 1e-3  # times the mean input variance: only keeps the normal equations well posed

_plain_forward = SparseMLP._torch_forward


def _corrected_forward(self, x2):
    y = _plain_forward(self, x2)
    corr = getattr(self, "error_correction", None)
    if corr is None:
        return y
    mean, u, v = corr
    return y + ((x2.float() - mean) @ u @ v).to(y.dtype)


def fit(mlp: SparseMLP, x: torch.Tensor, dense: torch.Tensor) -> tuple:
    """(mean x, ridge map A [d, d], right singular vectors of the fitted values) of the layer's error at its dials
    (x float, dense = the dense MLP's output on x)."""
    err = dense - mlp._torch_forward(x)
    mean = x.mean(0)
    xc = x - mean
    lam = RIDGE * xc.pow(2).sum(1).mean()
    a = torch.linalg.solve(xc.T @ xc + lam * torch.eye(x.shape[1]), xc.T @ (err - err.mean(0)))
    return mean, a, torch.linalg.svd(xc @ a, full_matrices=False)[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", required=True, help="a default conversion (densesparse convert)")
    ap.add_argument("--ranks", default="8,32")
    ap.add_argument("--targets", default="0.5,0.35,0.25")
    ap.add_argument("--fit-tokens", type=int, default=4096, help="calibration tokens per layer for the fit")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "error-correction-smollm2.json"))
    args = ap.parse_args()
    started, commit = time.time(), git_commit()
    torch.set_grad_enabled(False)
    SparseMLP._torch_forward = _corrected_forward
    ranks = [int(r) for r in args.ranks.split(",")]
    spec = read_spec(Path(args.sparse))
    model = load(args.sparse, mlp_flops=1.0)
    tok = load_tokenizer(args.sparse)
    mlps = sparse_mlps(model)
    batches, provenance, _ = calibration_windows(tok, None, args.fit_tokens, 512,
                                                 torch.Generator().manual_seed(args.seed), 0)
    samples = [s.x.float() for s in collect(model, resolve_layout(model), batches)]
    dense_out = [m._dense_forward(x) for m, x in zip(mlps, samples)]  # the same at every budget
    wins, bos = wt2_windows(tok, args.windows)
    dense_mlp = sum(mlp_macs_dense(m.hidden, m.intermediate, m.gated) for m in mlps)

    def evaluate(target: float) -> dict:
        return evaluate_windows(model, wins, bos, [target], spec["budgets"])["rows"][0]

    rows = []
    for target in (float(t) for t in args.targets.split(",")):
        apply_budget(mlps, spec["budgets"], target)
        fits = [fit(m, x, y) for m, x, y in zip(mlps, samples, dense_out)]
        plain = evaluate(target)
        rows.append({"target": target, "rank": 0, "ppl": round(plain["ppl"], 4),
                     "mlp_flops_kept": round(plain["mlp_flops_kept"], 4)})
        for r in ranks:
            cost = sum(2 * m.hidden * r for m in mlps) / dense_mlp
            for m, (mean, a, vh) in zip(mlps, fits):
                m.error_correction = (mean, a @ vh[:r].T, vh[:r])
            corrected = evaluate(target)
            for m in mlps:
                m.error_correction = None
            same = evaluate(min(target + cost, 1.0))  # ours without it, at the corrected row's FLOPs
            rows.append({"target": target, "rank": r, "ppl": round(corrected["ppl"], 4),
                         "mlp_flops_kept": round(corrected["mlp_flops_kept"] + cost, 4),
                         "correction_flops": round(cost, 4), "ours_at_same_flops": {
                             "target": round(target + cost, 4), "ppl": round(same["ppl"], 4),
                             "mlp_flops_kept": round(same["mlp_flops_kept"], 4)}})
            print(f"target {target:.2f} rank {r:3d}: {plain['ppl']:8.3f} -> {corrected['ppl']:8.3f} "
                  f"(+{cost:.4f} FLOPs; ours at those FLOPs {same['ppl']:8.3f})", flush=True)
    write_json({
        "what": __doc__.splitlines()[0], "sparse": args.sparse, "conversion": {
            k: spec.get(k) for k in ("expert_size", "gate_scale", "bias_correction", "early_decisions", "seconds")},
        "data": str(WT2.relative_to(ROOT.parent)), "protocol": f"wt2-64k cut to its first {args.windows} windows",
        "fit": {"tokens": args.fit_tokens, "seed": args.seed, "calibration": provenance, "ridge": RIDGE},
        "command": "python " + " ".join(sys.argv), "commit": commit,
        "versions": {"densesparse": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "seconds": round(time.time() - started, 1), "rows": rows}, args.out)
    print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
    main()
