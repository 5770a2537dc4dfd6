"""Experiment, not in the product: the bias correction measured on sparse-upstream inputs (sequential calibration).

    python bench/sequential_bias.py --sparse DIR [--tokens 2048] [--targets 0.5,0.35,0.25] [--windows 16]

`convert` measures each layer's bias (the shrunk mean of dense minus sparse MLP output) on held-out calibration
inputs of the dense model. Sequentially, layer l would see the inputs the already-sparsified (and corrected) layers
before it produce. Both are measured here on the same calibration windows (the last --tokens of the conversion's
own sample, drawn again with its seed), so only the upstream differs:
  default      the conversion's own biases (1024 random held-out tokens per layer, dense inputs)
  windows      the same rule on these windows' dense inputs
  sequential   the same rule on these windows' inputs with every earlier layer sparse and corrected (one forward
               per budget; each layer's bias is set before its output moves on)
Evaluated on WikiText-2 test windows (protocol wt2-64k cut to --windows), CPU float32.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import git_commit, load_conversion, wt2_windows

from densesparse import __version__
from densesparse.budget import shrunk_mean
from densesparse.data import calibration_windows
from densesparse.evaluate import evaluate_windows
from densesparse.report import write_json
from densesparse.runtime import DIALS, apply_budget, sparse_mlps


def fit_biases(model, mlps, budgets, row: int, target: float, ids: torch.Tensor, sequential: bool) -> None:
    """Set every layer's bias row `row` from one forward over ids: the layer's error at the target's dials on its
    input, with the earlier layers sparse at the target (sequential) or dense."""
    apply_budget(mlps, budgets, target)
    dials = [m.dials() for m in mlps]
    mixes = [m.bias_mix for m in mlps]
    if not sequential:
        apply_budget(mlps, budgets, 1.0)

    def pre(mod, args, i):
        x = args[0].reshape(-1, args[0].shape[-1])
        own = mod.dials()
        for k, v in zip(DIALS, dials[i]):
            setattr(mod, k, v)
        mod.bias_mix = None  # the error of the uncorrected sparse forward
        mod.budget_bias[row] = shrunk_mean(mod._dense_forward(x) - mod._torch_forward(x))
        mod.bias_mix = mixes[i]
        if not sequential:  # the layer stays dense for the layers after it
            for k, v in zip(DIALS, own):
                setattr(mod, k, v)
            mod.bias_mix = None
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: pre(mod, args, i)) for i, m in enumerate(mlps)]
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse", required=True, help="a default conversion's directory")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--targets", default="0.5,0.35,0.25")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sequential-bias-smollm2.json"))
    args = ap.parse_args()
    started, commit = time.time(), git_commit()
    torch.set_grad_enabled(False)
    model, tok, spec = load_conversion(args.sparse)
    mlps = sparse_mlps(model)
    cal = spec["calibration"]
    batches, _, _ = calibration_windows(tok, None, cal["tokens"], cal["seq_len"],
                                        torch.Generator().manual_seed(spec["seed"]))
    ids = torch.stack(batches[-(args.tokens // cal["seq_len"]):])
    wins, bos = wt2_windows(tok, args.windows)
    budgets = spec["budgets"]
    own = [m.budget_bias.clone() for m in mlps]
    rows = []
    for mode in ("default", "windows", "sequential"):
        for target in (float(t) for t in args.targets.split(",")):
            for m, b in zip(mlps, own):
                m.budget_bias.copy_(b)
            if mode != "default":
                row = next(i for i, b in enumerate(budgets) if abs(b["target"] - target) < 1e-9)
                fit_biases(model, mlps, budgets, row, target, ids, sequential=mode == "sequential")
            r = evaluate_windows(model, wins, bos, [target], budgets)["rows"][0]
            rows.append({"mode": mode, "target": target, "mlp_flops_kept": round(r["mlp_flops_kept"], 4),
                         "ppl": round(r["ppl"], 4)})
            print(rows[-1], flush=True)
    write_json({"what": __doc__.splitlines()[0], "sparse": args.sparse, "bias_tokens": int(ids.numel()),
                "protocol": f"wt2-64k cut to its first {args.windows} windows",
                "command": "python " + " ".join(sys.argv), "commit": commit,
                "versions": {"densesparse": __version__, "torch": torch.__version__},
                "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                "seconds": round(time.time() - started, 1), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
