"""Render results: rich tables, JSON files, the PPL-vs-FLOPs plot and the model card."""
from __future__ import annotations

import json
from pathlib import Path


def budget_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['model']} on {report['tokens']} tokens")
    speed = any("tokens_per_s" in r for r in report["budgets"])
    cols = ["MLP FLOPs target", "MLP kept", "total kept", "PPL", "vs dense", "experts/token (mean, p50, p95)"]
    for col in cols + (["tokens/s"] if speed else []):
        table.add_column(col, justify="right")
    dense = report["dense"]["ppl"]
    if all(r["target"] != 1.0 for r in report["budgets"]):
        table.add_row("dense", "1.000", "1.000", f"{dense:.3f}", "1.000x", "all", *([""] if speed else []))
    for r in report["budgets"]:
        e = r["experts_per_token"]
        table.add_row(f"{r['target']:.2f}", f"{r['mlp_flops_kept']:.3f}", f"{r['total_flops_kept']:.3f}",
                      f"{r['ppl']:.3f}", f"{r['ppl'] / dense:.3f}x", f"{e['mean']:.1f}, {e['p50']}, {e['p95']}",
                      *([str(r.get("tokens_per_s", ""))] if speed else []))
    return table


def write_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
    return path


def plot_curves(curves: dict[str, list[tuple[float, float]]], dense_ppl: float, path: str | Path, title: str) -> Path:
    """One line per method: PPL (log scale) against the measured fraction of MLP FLOPs kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label=f"dense {dense_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("MLP FLOPs kept (measured, router included)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(report: dict, path: str | Path) -> Path:
    pts = [(r["mlp_flops_kept"], r["ppl"]) for r in report["budgets"]] + [(1.0, report["dense"]["ppl"])]
    return plot_curves({"densesparse": pts}, report["dense"]["ppl"], path, Path(report["model"]).name)


def model_card(spec: dict, recipe: dict) -> str:
    rows = "\n".join(f"| {b['target']:.2f} | {b['calib_mlp_flops_kept']:.3f} |" for b in spec["budgets"])
    cfg = recipe.get("config", {})
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.items()
                     if v not in (None, False) and k not in ("model", "out"))
    quality = spec.get("quality_target")
    chosen = (f" (the smallest calibrated budget within +{quality['max_ppl_increase']:.0%} of dense perplexity "
              f"{quality['dense_ppl']:.2f} on {quality['tokens']} held-out calibration tokens)") if quality else ""
    return f"""# Sparse model written by densesparse {spec['tool_version']}

Source: `{spec.get('source_model')}` ({spec['base_class']}). Every FFN is sliced into {spec['n_experts']} experts of
{spec['expert_size']} neurons ({spec['grouping']} grouping) plus {spec['n_shared']} always-on neurons, with a threshold
router per layer. Weights keep their original names (FFN rows/columns permuted) plus `router.*` tensors.

Command: `densesparse convert {cfg.get('model') or ''} --out {cfg.get('out', '')} {flags}`

Calibration: {spec['calibration']['tokens']} tokens from {', '.join(Path(f).name for f in spec['calibration']['files'])}
(sha256 {spec['calibration']['sha256'][:16]}), seed {spec['seed']}.

Load it with `densesparse.load(dir, mlp_flops=0.5)` or
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` then `model.set_mlp_flops(0.5)`.
Default budget: {spec['default_mlp_flops']}{chosen}. Evaluate with `densesparse eval DIR --data YOUR.txt`.

| MLP FLOPs target | kept on calibration (held out) |
|---|---|
{rows}
"""


def eval_markdown(report: dict) -> str:
    dense = report["dense"]["ppl"]
    lines = [f"## Evaluation\n\n`densesparse eval` on {', '.join(Path(f).name for f in report['data'])} "
             f"({report['tokens']} tokens, windows of {report['seq_len']}):\n",
             "| MLP FLOPs target | MLP kept | total kept | PPL | vs dense | experts/token mean |",
             "|---|---|---|---|---|---|",
             f"| dense | 1.000 | 1.000 | {dense:.3f} | 1.000x | all |"]
    for r in report["budgets"]:
        lines.append(f"| {r['target']:.2f} | {r['mlp_flops_kept']:.3f} | {r['total_flops_kept']:.3f} | "
                     f"{r['ppl']:.3f} | {r['ppl'] / dense:.3f}x | {r['experts_per_token']['mean']:.1f} |")
    return "\n".join(lines) + "\n"


def record_in_card(model_dir: str | Path, report: dict) -> Path | None:
    """Put the latest evaluation table into the sparse model's card (replacing an older one)."""
    card = Path(model_dir) / "README.md"
    if not card.exists():
        return None
    text = card.read_text().split("\n## Evaluation\n")[0].rstrip() + "\n\n"
    tmp = card.with_name(".README.md.tmp")
    tmp.write_text(text + eval_markdown(report))
    tmp.replace(card)
    return card
