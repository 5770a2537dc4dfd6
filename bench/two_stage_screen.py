"""Experiment (adopted in commit 7a30adb): what the down skip should judge when a layer decides early.

    python bench/two_stage_screen.py --sparse DIR [--budget 0.5] [--tokens 2048]

Where a layer decides early, its gate dial and down skip form a cascade: the gate dial judges every neuron on the
partial gate over the decision channels; the neurons it keeps get a partial up over those channels, and the down
skip judges them; the neurons the down skip keeps are finished over the other channels and go through down. Two
ways to run the second stage, compared per layer at the same multiply-adds:
  completed   (the rule before 7a30adb) each neuron the gate dial keeps has its gate completed first, and the down
              skip judges |act(full gate) * partial up| * ||down row||
  partial     the down skip judges |act(partial gate) * partial up| * ||down row||, so only the neurons it keeps
              pay for completing their gate (and up) rows
For each layer (every layer that decides early with both dials on at --budget), the cost of DIR's own dials under
the completed rule is the budget; each rule gets the gate threshold at 0.75 / 0.9 / 1 / 1.15 x DIR's and the down
threshold bisected to that budget, and its least error is kept. "completed +f" spends f more of the layer's dense
MLP multiply-adds per token under the completed rule: what the partial rule's saving is worth. Errors are
||output error of both dials' drops||^2 / ||MLP output||^2 (input skip left out of both), summed over the layers.
Tokens: calibration windows DIR did not sample (its seed, far end of its order); WikiText is never read.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decision_screens import Layer, mlp_inputs, screen_setup, write_screen

from densesparse.runtime import sparse_mlps

GATE_MULTS = (0.75, 0.9, 1.0, 1.15)
EXTRA = (0.01, 0.02, 0.03)


def least_error(L: Layer, cost, s2: torch.Tensor, budget: float) -> float:
    """The least error over the gate thresholds, the down threshold bisected (log scale) to cost <= budget."""
    best = float("inf")
    for mult in GATE_MULTS:
        k1 = L.s_dec >= L.m.gate_tau * mult
        lo, hi = -12.0, 6.0
        for _ in range(36):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(k1, k1 & (s2 >= 10 ** mid)) > budget else (lo, mid)
        best = min(best, L.err(k1 & (s2 >= 10 ** hi)))
    return best


def screen(L: Layer) -> dict:
    m = L.m
    d, mm, tokens = L.x.shape[1], m.intermediate, L.x.shape[0]
    n_in, n_dec = L.n_in, L.n_dec
    x_dec = L.x * L.dec
    up_dec = x_dec @ L.wu.T
    norms = m.down_norms()
    s_completed = (m.act(L.xs @ L.wg.T) * up_dec).abs() * norms
    s_partial = (m.act(x_dec @ L.wg.T) * up_dec).abs() * norms

    def count(k):
        return k.sum(1, keepdim=True)

    def completed(k1, k2):  # gate completion + partial up for k1; up completion + down for k2
        return float((mm * n_dec + count(k1) * n_in + count(k2) * (n_in - n_dec + d)).sum())

    def partial(k1, k2):  # partial up for k1; gate and up completion + down for k2
        return float((mm * n_dec + count(k1) * n_dec + count(k2) * (2 * (n_in - n_dec) + d)).sum())

    k1 = L.keep
    k2 = k1 & (s_completed >= m.down_tau)
    budget = completed(k1, k2)
    row = {"own_dials": L.err(k2), "completed": least_error(L, completed, s_completed, budget),
           "partial": least_error(L, partial, s_partial, budget)}
    for f in EXTRA:
        row[f"completed +{f}"] = least_error(L, completed, s_completed, budget + f * 3 * mm * d * tokens)
    return {k: round(v, 5) for k, v in row.items()}


def main():
    args, started, commit, model, _, held = screen_setup(__doc__, "two-stage-screen-smollm2.json")
    mlps = sparse_mlps(model)
    layers = []
    with torch.no_grad():
        for i, (m, x) in enumerate(zip(mlps, mlp_inputs(model, mlps, held))):
            if m.gated and m.deciding and m.gate_tau > 0 and m.down_tau > 0:
                layers.append({"layer": i, **screen(Layer(m, x))})
                print(layers[-1], flush=True)
    summary = {k: round(sum(r[k] for r in layers), 4) for k in layers[0] if k != "layer"} if layers else {}
    write_screen(__doc__, args, started, commit, held, {"layers_screened": len(layers), "summary": summary,
                                                       "layers": layers})
    print(summary)


if __name__ == "__main__":
    main()
