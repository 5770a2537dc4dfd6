"""Where a default conversion's time goes: `densesparse convert`'s per-phase wall seconds (spec phase_seconds),
appended to a JSON history with the commit, machine and versions.

    python bench/convert_phases.py [--out bench/results/convert-phases-smollm2.json] [--note ...]
    python bench/convert_phases.py --sparse DIR --commit REV   # record a conversion already made at REV

Run it on an otherwise idle machine: the phases are wall times (the 2-core CPU shared with another job runs both
several times slower).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import git_commit

from densesparse import __version__
from densesparse.config import ConvertConfig
from densesparse.io import read_spec
from densesparse.pipeline import convert


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "convert-phases-smollm2.json"))
    ap.add_argument("--sparse", default=None, help="record this existing conversion instead of converting")
    ap.add_argument("--commit", default=None, help="with --sparse: the commit that conversion ran")
    ap.add_argument("--note", default=None)
    args = ap.parse_args()
    if bool(args.sparse) != bool(args.commit):
        raise SystemExit("--sparse and --commit go together")
    commit = args.commit or git_commit()
    started = time.time()
    if args.sparse:
        spec = read_spec(Path(args.sparse))
    else:
        with tempfile.TemporaryDirectory(prefix="densesparse-phases-") as tmp:
            spec = convert(ConvertConfig(out=str(Path(tmp) / "sparse")))
    run = {
        "command": "python bench/convert_phases.py" + (f" --sparse {args.sparse} --commit {args.commit}"
                                                        if args.sparse else ""),
        "what": "an existing default conversion, recorded" if args.sparse else "densesparse convert, the defaults",
        "commit": commit,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "versions": {"densesparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "convert_seconds": spec["seconds"],
        "phase_seconds": spec.get("phase_seconds"),
        "calibration_tokens": spec["calibration"]["tokens"],
        "wall_s": round(time.time() - started, 1),
    }
    if args.note:
        run["note"] = args.note
    out = Path(args.out)
    history = json.loads(out.read_text()) if out.exists() else {"model": "the default (SmolLM2-135M-Instruct)",
                                                                 "runs": []}
    history["runs"].append(run)
    out.write_text(json.dumps(history, indent=1) + "\n")
    phases = run["phase_seconds"] or {}
    print(f"{run['convert_seconds']} s: " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items(),
                                                                                     key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
