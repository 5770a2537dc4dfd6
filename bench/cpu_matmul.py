"""Why the refinement runs in float32 on the CPU: float32 against bfloat16 matrix products on this machine.

    python bench/cpu_matmul.py [--out bench/results/cpu-matmul.json]

One SmolLM2-135M MLP projection (a 512-token window of hidden 576 into 1536), plain and under bfloat16 autocast,
median of 20 timed calls after warm-up, appended to a JSON history with the CPU's name and its bfloat16 flags.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from quality import git_commit  # noqa: E402

from densesparse.report import write_json  # noqa: E402

SHAPE = (512, 576, 1536)  # tokens, hidden, intermediate


def gflops(x: torch.Tensor, w: torch.Tensor, autocast: bool = False) -> float:
    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(25):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return 2 * SHAPE[0] * SHAPE[1] * SHAPE[2] / statistics.median(times) / 1e9


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and its bfloat16 / AMX flags, from /proc/cpuinfo where there is one."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor())
    return name, sorted({f for f in text.split() if "bf16" in f or f.startswith("amx")})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-matmul.json"))
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE[0], SHAPE[1], generator=gen)
    w = torch.randn(SHAPE[2], SHAPE[1], generator=gen)
    name, flags = cpu_info()
    run = {"command": "python bench/cpu_matmul.py", "commit": git_commit(), "cpu": name,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_flags": flags,
           "shape": SHAPE, "float32_gflops": round(gflops(x, w), 1),
           "bfloat16_gflops": round(gflops(x.bfloat16(), w.bfloat16()), 1),
           "autocast_bfloat16_gflops": round(gflops(x, w, autocast=True), 1)}
    run["float32_over_bfloat16"] = round(run["float32_gflops"] / run["bfloat16_gflops"], 2)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    write_json({"what": __doc__.splitlines()[0], "runs": runs + [run]}, out)
    print(json.dumps(run))


if __name__ == "__main__":
    main()
