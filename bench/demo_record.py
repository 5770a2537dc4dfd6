"""Record what `make demo` measured (conversion time, the dials each budget uses, the eval sweep) as JSON.

    make demo [EVAL_TEXT=...] && python bench/demo_record.py [--demo demo] [--out bench/results/demo-fresh-clone.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch
import transformers

from densesparse import __version__
from densesparse.runtime import COMPACT_BELOW, decides_early

TARGETS = (0.75, 0.5, 0.35, 0.25)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default="demo")
    ap.add_argument("--out", default="bench/results/demo-fresh-clone.json")
    ap.add_argument("--note", default=None, help="how the demo was run, kept in the record")
    args = ap.parse_args()
    demo = Path(args.demo)
    spec = json.loads((demo / "sparse" / "config.json").read_text())["densesparse"]
    report = json.loads((demo / "report.json").read_text())
    dials = []
    for b in spec["budgets"]:
        if b["target"] in TARGETS:
            dials.append({"target": b["target"], "layers": len(b["thresholds"]),
                          "router_layers": sum(t < 1.0 for t in b["thresholds"]),
                          "gate_layers": sum(g > 0 for g in b["gate_tau"]),
                          "input_layers": sum(x > 0 for x in b["input_tau"]),
                          "down_layers": sum(x > 0 for x in b["down_tau"]),
                          # layers whose gate dial or down skip decide early (on the larger input channels)
                          "early_layers": sum(decides_early(*dials) for dials in
                                              zip(b.get("decide_tau", []), b["input_tau"], b["gate_tau"],
                                                  b["down_tau"])),
                          # layers whose one-token calls take the compacted kernels on CUDA
                          "compact_layers": sum(f <= COMPACT_BELOW for f in b.get("expert_frac", []))})
    record = {
        "command": "make demo [EVAL_TEXT=...] && python bench/demo_record.py",
        "commit": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "versions": {"densesparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "model": spec["source_model"],
        "convert_seconds": spec["seconds"],
        "convert_phase_seconds": spec.get("phase_seconds"),  # conversions from before the timer have none
        "calibration": spec["calibration"],
        "dials_per_budget": dials,
        "eval": {"data": report["data"], "tokens": report["tokens"], "dense_ppl": report["dense"]["ppl"],
                 "rows": [{"target": r["target"], "mlp_flops_kept": r["mlp_flops_kept"], "ppl": r["ppl"]}
                          for r in report["budgets"]]},
    }
    if args.note:
        record["note"] = args.note
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
