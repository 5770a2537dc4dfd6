"""What a converted model's budgets ask of the GPU kernels, per layer: the fractions its dials keep, measured.

    python bench/dial_mix.py --sparse SPARSE_DIR [--windows 4] [--out bench/results/dial-mix-smollm2.json]

For each budget, the sparse model runs the first WikiText-2 test windows (evaluation text, as in bench/quality.py)
with its per-layer counters on, and the record keeps, per FFN layer: the fraction of experts selected, of gate rows
computed (shared + selected), of input channels used (input skip), of input channels the dials decide on (early
decisions; = input where the layer does not decide early), of up rows computed, of neurons kept for down, and the
layer's MLP FLOPs kept. bench/gpu_speed.py --dial-mix replays these fractions on a Llama-3-8B-shaped layer (the
real model's shapes are too small to time anything but launches), to measure what the real budgets cost in time.
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

from quality import WT2, git_commit, wt2_windows  # noqa: E402

import densesparse  # noqa: E402
from densesparse import __version__  # noqa: E402
from densesparse.runtime import LayerStats, sparse_mlps  # noqa: E402

TARGETS = (0.75, 0.5, 0.35, 0.25)


def layer_fractions(mm) -> dict:
    s = mm.stats
    m, d = mm.intermediate, mm.hidden
    rows = s.experts * mm.expert_size + s.tokens * mm.n_shared
    return {"experts": s.experts / (s.tokens * mm.n_experts), "gate_rows": rows / (s.tokens * m),
            "input": s.input_channels / (s.tokens * d), "decide": s.decide_channels / (s.tokens * d),
            "up_rows": s.up_rows / (s.tokens * m), "down": s.down_neurons / (s.tokens * m),
            "mlp_flops_kept": (s.gate_cells + s.up_cells + s.down_neurons * d) / (3 * s.tokens * m * d)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparse", required=True, help="a directory written by `densesparse convert`")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dial-mix-smollm2.json"))
    args = ap.parse_args()
    t0 = time.time()
    budgets = []
    for target in TARGETS:
        model = densesparse.load(args.sparse, mlp_flops=target)
        wins, _ = wt2_windows(transformers.AutoTokenizer.from_pretrained(args.sparse), args.windows)
        mlps = sparse_mlps(model)
        for mm in mlps:
            mm.stats = LayerStats(mm.n_experts)
        with torch.no_grad():
            for w in wins:
                model(w[None])
        layers = [{k: round(v, 4) for k, v in layer_fractions(mm).items()} for mm in mlps]
        mean = {k: round(sum(L[k] for L in layers) / len(layers), 4) for k in layers[0]}
        budgets.append({"target": target, "layers": layers, "mean": mean})
        print(target, mean, flush=True)
    spec = json.loads((Path(args.sparse) / "config.json").read_text())["densesparse"]
    record = {
        "command": "python bench/dial_mix.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "versions": {"densesparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "model": spec["source_model"], "expert_size": spec["expert_size"], "n_shared": spec["n_shared"],
        "hidden_size": spec["hidden_size"], "intermediate_size": spec["intermediate_size"],
        "text": f"{WT2.name}, first {args.windows} windows of 1024 tokens", "budgets": budgets,
        "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
