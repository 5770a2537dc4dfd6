"""Which loss probe: the default (one probe at the budget.PROBE_BUDGET allocation) against none, a second probe on
top, one probe at each other allocation of 25 / 35 / 50%, and one on twice the tokens, judged on held-out
CALIBRATION text (never WikiText).

    python bench/probe_variants.py --sparse SPARSE_DIR [--out bench/results/probe-variants-smollm2.json]

The layer points are recomputed from the directory's weights, gate scales and routers on its calibration text and
seed (as `calibrate --no-refit-routers --max-ppl-increase` would: the held-out windows are kept aside); each
variant only rescales them before the budget
sweep, then gets its bias correction and is measured at 50 / 35 / 25%: KL(dense || sparse) per token on 4096
held-out calibration tokens (the windows --max-ppl-increase checks on) and the MLP FLOPs kept there. The KL falls
steeply with the FLOPs (about 7% per 0.01 here), so compare variants at the FLOPs they land on.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import git_commit

from densesparse import __version__, budget
from densesparse.arch import decoder_layers, resolve_layout
from densesparse.data import calibration_windows
from densesparse.evaluate import _mlp_macs
from densesparse.io import load, load_tokenizer
from densesparse.pipeline import HELDOUT_TOKENS, QUALITY_TOKENS, _split
from densesparse.runtime import LayerStats, apply_budget, sparse_mlps
from densesparse.stats import collect

TARGETS = (0.25, 0.35, 0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparse", required=True, help="a directory written by `densesparse convert`")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "probe-variants-smollm2.json"))
    args = ap.parse_args()
    started = time.time()
    torch.set_grad_enabled(False)
    model = load(args.sparse, mlp_flops=1.0)
    tok = load_tokenizer(args.sparse)
    spec = model.config.densesparse
    gen = torch.Generator().manual_seed(spec["seed"])
    batches, _, held_wins = calibration_windows(tok, None, spec["calibration"]["tokens"],
                                                spec["calibration"]["seq_len"], gen, QUALITY_TOKENS)
    mlps = sparse_mlps(model)
    layout = resolve_layout(model)
    points = []
    for mlp, s in zip(mlps, collect(model, layout, batches)):
        held = _split(s.x, gen)[1]
        points.append(budget.layer_points(mlp, held, s.weight, spec["down_skip"], spec["input_skip"],
                                          spec.get("early_decisions", False)))
    probe_wins = budget.probe_windows(batches)
    layers = decoder_layers(model, layout)
    for m in mlps:
        budget.set_dials(m, None)
    dense = [budget.reference(model, w) for w in held_wins]

    def probe_at(target, pts, wins=probe_wins):
        return budget.probe_losses(model, mlps, pts, wins, at=target, layers=layers)

    def measure(name, factors):
        # only the budgets measured, each with its bias row
        weighted = budget.reweight(points, factors)
        budgets = budget.calibrate_budgets(weighted, min(TARGETS), list(TARGETS))
        budget.set_budget_biases(mlps, weighted, budgets)
        row = {"variant": name, "factors": [round(f, 4) for f in factors], "budgets": []}
        for t in TARGETS:
            apply_budget(mlps, budgets, t)
            for m in mlps:
                m.stats = LayerStats(m.n_experts)
            kl = budget.kl_per_token(model, held_wins, dense)
            kept = _mlp_macs(mlps, [m.stats for m in mlps]) / _mlp_macs(mlps, None)
            for m in mlps:
                m.stats = None
            row["budgets"].append({"target": t, "kl": round(kl, 5), "mlp_flops_kept": round(kept, 4)})
        print(name, row["budgets"], flush=True)
        return row

    one = probe_at(budget.PROBE_BUDGET, points)
    variants = [("none", [1.0] * len(mlps)), (f"probe at {budget.PROBE_BUDGET} (default)", one),
                ("probe twice", [a * b for a, b in zip(one, probe_at(budget.PROBE_BUDGET,
                                                                     budget.reweight(points, one)))]),
                *((f"probe at {b}", probe_at(b, points)) for b in (0.25, 0.35, 0.5) if b != budget.PROBE_BUDGET),
                (f"probe at {budget.PROBE_BUDGET} on {2 * budget.PROBE_TOKENS} tokens",
                 probe_at(budget.PROBE_BUDGET, points, budget.probe_windows(batches, 2 * budget.PROBE_TOKENS)))]
    rows = [measure(name, factors) for name, factors in variants]
    record = {
        "command": "python bench/probe_variants.py " + " ".join(sys.argv[1:]), "commit": git_commit(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "versions": {"densesparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "model": spec["source_model"], "calibration": spec["calibration"],
        "text": f"{len(held_wins)} held-out calibration windows, {sum(w.numel() for w in held_wins)} tokens",
        "held_out_tokens_per_layer": HELDOUT_TOKENS, "rows": rows, "seconds": round(time.time() - started, 1)}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
