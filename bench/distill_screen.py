"""Experiment: how long and how fast to refine the biases end to end (picked the default steps and step size).

    python bench/distill_screen.py --sparse DIR --tokens 4096 [--settings 0x1x1,20x1x1,...]

DIR is a conversion made with --distill-steps 0 (layer-local biases only). Each setting STEPSxWINDOWSxLR[xLEN]
refines a fresh copy of DIR's 35% and 25% bias rows with distill.distill_biases: STEPS steps of WINDOWS calibration
windows (each cut to its first LEN tokens where given), step size LR x distill.LR (0 steps: DIR as it is). The score
is the sparse model's mean KL per token from the dense model at 35% and 25%, on calibration windows DIR did not
sample (its seed, far end of its order): the refinement fits on the conversion's own windows, so these are held out.
WikiText is never read. The refinement's own window draws use a separate generator (seed 1), the same for every
setting.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decision_screens import screen_setup, write_screen  # noqa: E402
from quality import load_conversion  # noqa: E402

from densesparse.budget import kl_per_token, reference  # noqa: E402
from densesparse.data import calibration_windows  # noqa: E402
from densesparse.distill import LR, distill_biases  # noqa: E402
from densesparse.runtime import apply_budget, sparse_mlps  # noqa: E402

TARGETS = [0.35, 0.25]


def main():
    args, started, commit, _, spec, held = screen_setup(
        __doc__, "distill-screen-smollm2.json",
        lambda ap: ap.add_argument("--settings", default="0x1x1,20x1x1,40x1x1,20x2x1,20x1x2,20x1x4"))
    if spec.get("bias_distill"):
        raise SystemExit(f"{args.sparse} is already refined: convert with --distill-steps 0")
    rows = []
    for setting in args.settings.split(","):
        steps, windows, mult, *cut = setting.split("x")
        model, tok, spec = load_conversion(args.sparse, 1.0)
        cal = spec["calibration"]
        wins = calibration_windows(tok, None, cal["tokens"], cal["seq_len"],
                                   torch.Generator().manual_seed(spec["seed"]))[0]
        if cut:
            wins = [w[:int(cut[0])] for w in wins]
        mlps = sparse_mlps(model)
        t0 = time.time()
        trace = distill_biases(model, mlps, spec["budgets"], wins, TARGETS, int(steps),
                               torch.Generator().manual_seed(1), lr=LR * float(mult),
                               per_step=int(windows)) if int(steps) else None
        seconds = time.time() - t0
        apply_budget(mlps, spec["budgets"], 1.0)
        with torch.no_grad():
            dense = [reference(model, w) for w in held]
            kl = {}
            for t in TARGETS:
                apply_budget(mlps, spec["budgets"], t)
                kl[str(t)] = round(kl_per_token(model, held, dense), 5)
        rows.append({"steps": int(steps), "windows_per_step": int(windows), "lr_times": float(mult),
                     "window_tokens": int(cut[0]) if cut else cal["seq_len"],
                     "refine_seconds": round(seconds, 1), "heldout_kl": kl, "train_trace": trace})
        print(rows[-1], flush=True)
    write_screen(__doc__, args, started, commit, held, {"targets": TARGETS, "rows": rows})


if __name__ == "__main__":
    main()
