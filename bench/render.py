"""Render the committed benchmark JSON files as the markdown tables of bench/README.md and README.md (between
the <!-- name:start/end --> markers).

    python bench/render.py
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = (0.75, 0.5, 0.35, 0.25)


def quality_table(q: dict) -> str:
    dense = q["dense"]["ppl"]
    by_method: dict[str, dict] = {}
    for r in q["rows"]:
        by_method.setdefault(r["method"], {})[r["target"]] = r
    head = "| method | " + " | ".join(f"{int(t * 100)}% kept" for t in TARGETS) + " |"
    lines = [f"Dense PPL {dense:.2f} on {q['tokens']} tokens ({q['protocol']}). Each cell: PPL (measured MLP FLOPs "
             "kept, router included).", "", head, "|---" * (len(TARGETS) + 1) + "|"]
    for method, rows in by_method.items():
        cells = []
        for t in TARGETS:
            r = rows.get(t)
            cells.append(f"{r['ppl']:.2f} ({r['mlp_flops_kept']:.3f})" if r else "n/a")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    ours = by_method.get("densesparse", {})
    lines += ["", head.replace("| method |", "| ratio to dense PPL |"), "|---" * (len(TARGETS) + 1) + "|",
              "| densesparse | " + " | ".join(f"{ours[t]['ppl'] / dense:.3f}x" if t in ours else "n/a"
                                             for t in TARGETS) + " |", ""]
    conversion = (f"conversion of the default model {q['convert_seconds']} s" if q.get("convert_seconds")
                  else "ours reused a default conversion (--sparse)")
    lines.append(f"Command: `{q['command']}`; commit {q['commit'][:10]}; {q['machine']}; "
                 f"torch {q['versions']['torch']}, transformers {q['versions']['transformers']}; "
                 f"{q['seconds']:.0f} s in all; {conversion}.")
    for run in q.get("replaced_runs", []):
        how = (f"conversion {run['convert_seconds']} s" if run.get("convert_seconds")
               else "a default conversion reused (--sparse)")
        lines.append(f"Rows {', '.join(run['methods'])} replaced by `{run['command']}`; commit {run['commit'][:10]}; "
                     f"{run['seconds']:.0f} s; {how}" + (f" ({run['note']})." if run.get("note") else "."))
    return "\n".join(lines)


def predictors_table(p: dict) -> str:
    targets = sorted({r["target"] for r in p["rows"]}, reverse=True)
    by_method: dict[str, dict] = {}
    for r in p["rows"]:
        by_method.setdefault(r["method"], {})[r["target"]] = r
    lines = [f"Dense PPL {p['dense']['ppl']:.2f}; {p['data']}; allocation {p['allocation']}. Each cell: PPL "
             "(fraction of neurons the budget leaves once the predictor is paid).", "",
             "| score | " + " | ".join(f"{int(t * 100)}% MLP FLOPs" for t in targets) + " |",
             "|---" * (len(targets) + 1) + "|"]
    for method, rows in by_method.items():
        lines.append(f"| {method} | " + " | ".join(
            f"{rows[t]['ppl']:.2f} ({rows[t]['neurons_kept']:.3f})" if t in rows else "n/a" for t in targets) + " |")
    lines.append(f"\nCommand: `{p['command']}`; commit {p['commit'][:10]}; {p['machine']}; {p['seconds']:.0f} s.")
    return "\n".join(lines)


def gpu_table(g: dict) -> str:
    lines = [f"{g['device']}, torch {g['torch']}, triton {g['triton']}, commit {g.get('commit')}. One MLP layer, bf16, "
             "time = what SparseMLP runs: router + selection + sparse MLP (Triton) at up to "
             f"{g['dense_above_tokens']} tokens per call, the plain dense MLP above that "
             "(`runtime.DENSE_ABOVE_TOKENS`, "
             "the measured crossover, key `crossover`; the router is then not run) (medians of CUDA-graph replays, "
             "weights rotated against L2).", "",
             "| shape | expert size | kept | batch | dense us | sparse us | ideal us | router us | speedup | path |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in g["mlp"]:
        if r["shape"] != "llama3-8b" or r["expert_size"] not in (8, 32) or r["kept"] not in (0.5, 0.25):
            continue
        lines.append(f"| {r['shape']} | {r['expert_size']} | {r['kept']} | {r['batch']} | {r['dense_us']:.1f} | "
                     f"{r['sparse_us']:.1f} | {r['ideal_us']:.1f} | {r['router_us']:.1f} | "
                     f"{r['dense_us'] / r['sparse_us']:.2f}x | {r.get('path', 'triton')}"
                     f"{' (compacted)' if r.get('compact') else ''} |")
    run = g.get("gate_dial_run", {})
    for r in g.get("gate_dial", []):
        lines.append(f"\nGate dial (commit {run.get('commit', g.get('commit'))}; {r['shape']}, "
                     f"expert size {r['expert_size']}, "
                     f"batch {r['batch']}; "
                     f"{r['experts_kept']:.0%} of experts, the gate keeping {r['up_rows_kept_of_selected']:.0%} of "
                     f"their up rows; MLP FLOPs kept {r['kept_flops_frac']:.3f}): dense {r['dense_us']:.1f} us, "
                     f"sparse {r['sparse_us']:.1f} us ({r['dense_us'] / r['sparse_us']:.2f}x); the same experts "
                     f"without the dial (FLOPs kept {r['kept_flops_frac_nodial']:.3f}) {r['sparse_nodial_us']:.1f} us.")
    if g.get("decode"):
        kv = g.get("kv_cache")
        kv_text = (f"{kv['cache']} of {kv['max_cache_len']} after a {kv['prompt_tokens']}-token prompt, CUDA graphs "
                   f"{'on' if kv['cuda_graphs'] else 'off'}") if isinstance(kv, dict) else "none"
        lines += ["", f"End to end, {g.get('e2e', {}).get('model', 'Llama-3-8B shape')}; weights: "
                      f"{g.get('e2e', {}).get('weights', 'random')}; KV cache: {kv_text}:", "",
                  *decode_lines(g)]
    lines.append(f"\nCommand: `{g['command'].split(' --note')[0]}` (one device call); tests: "
                 f"{g.get('tests', {}).get('result', 'not recorded')}.")
    return "\n".join(lines)


def sweep_table(g: dict) -> str:
    """gpu_speed.py --sweep: per shape and expert size, the batch-1 speedup at each kept fraction (and the
    pre-sliced ideal's), and (where measured) the lowest speedup at larger batches."""
    kepts = sorted({r["kept"] for r in g["mlp"]}, reverse=True)
    more = sorted({r["batch"] for r in g["mlp"] if r["batch"] > 1})
    lines = [f"{g['device']}, torch {g['torch']}, triton {g['triton']}, commit {g.get('commit')}. One MLP layer, bf16, "
             "random weights and routers (decode: each router's threshold bisected to the kept fraction). Each cell: "
             "dense / sparse at batch 1, sparse = router + selection + MLP (in parentheses: dense / the pre-sliced "
             "cuBLAS ideal)" + (f"; last column: the lowest dense / sparse at batch {' and '.join(map(str, more))} "
                                "over every kept fraction (those calls take the dense MLP above "
                                f"`runtime.DENSE_ABOVE_TOKENS` = {g['dense_above_tokens']})" if more else "") + ".",
             "", "| shape | expert size | " + " | ".join(f"{k:.0%} kept" for k in kepts)
             + (" | batch > 1, lowest |" if more else " |"), "|---|---|" + "---|" * (len(kepts) + bool(more))]
    for shape in dict.fromkeys(r["shape"] for r in g["mlp"]):
        for e in sorted({r["expert_size"] for r in g["mlp"] if r["shape"] == shape}):
            rows = [r for r in g["mlp"] if r["shape"] == shape and r["expert_size"] == e]
            one = {r["kept"]: r for r in rows if r["batch"] == 1}
            cells = [f"{one[k]['dense_us'] / one[k]['sparse_us']:.2f}x ({one[k]['dense_us'] / one[k]['ideal_us']:.2f}x)"
                     if k in one else "n/a" for k in kepts]
            if more:
                cells.append(f"{min(r['dense_us'] / r['sparse_us'] for r in rows if r['batch'] > 1):.3f}x")
            lines.append(f"| {shape} | {e} | " + " | ".join(cells) + " |")
    lines.append(f"\nCommand: `{g['command'].split(' --note')[0]}` (one device call, {g['wall_s']:.0f} s).")
    return "\n".join(lines)


DIAL_MIXES = (("defaults", "gpu-h100-dial-mix.json", "densesparse"),
              ("--no-input-skip", "gpu-h100-dial-mix-no-input-skip.json", "densesparse-input_skip=false"))


def _ppl_as_of(commit: str, method: str) -> dict:
    """{target: PPL} of `method` in the first committed version of quality-smollm2.json, from `commit` on, that has
    it: the PPL of the conversion a dial mix replays, not of a later one."""
    path, root = "bench/results/quality-smollm2.json", HERE.parent
    revs = subprocess.run(["git", "log", "--reverse", "--format=%H", f"{commit}^..HEAD", "--", path], cwd=root,
                          capture_output=True, text=True).stdout.split()
    for rev in [commit] + revs:
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
        if shown.returncode:
            continue
        found = {r["target"]: r["ppl"] for r in json.loads(shown.stdout)["rows"] if r["method"] == method}
        if found:
            return found
    return {}


def dial_mix_table(g: dict) -> str:
    """The dial-mix records of both conversions, with their WikiText PPL (_ppl_as_of)."""
    mix = g["dial_mix"]
    src = mix["source"]
    model = src["model"].split("/")[-1].split(".Q")[0]
    quality = json.loads((RESULTS / "quality-smollm2.json").read_text())
    lines = [f"{g['device']}, torch {g['torch']}, triton {g['triton']}, commit {g['commit']}. Each conversion's "
             f"per-layer dial fractions ({model}; `bench/dial_mix.py`: {src['text']}) replayed layer by layer on a "
             f"random-weight {mix['shape']} MLP layer, expert size {mix['expert_size']}, bf16, summed over the "
             f"{len(mix['budgets'][0]['layers'])} layers (medians of CUDA-graph replays; both conversions in one "
             f"device call). PPL: the quality table's ({quality['protocol']}) as committed when the replayed "
             "conversion was made (the first version of the record, from the dial mix's commit on, with that "
             "conversion's row; later rows come from later conversions). 'before': SparseMLP as of commit "
             "bf697ab (input cut, down-tau vector and all-on mask built by torch ops on every call).", "",
             "| conversion | MLP FLOPs kept | PPL | batch 1: dense / sparse us | speedup | batch 2 | batch 1 before |",
             "|---|---|---|---|---|---|---|"]
    for name, record, method in DIAL_MIXES:
        path = RESULTS / record
        if not path.exists():
            continue
        rec = json.loads(path.read_text())["dial_mix"]
        ppl = _ppl_as_of(rec["source"]["commit"], method)
        by = {(b["target"], b["batch"]): b for b in rec["budgets"]}
        for t in TARGETS:
            b1, b2, p = by.get((t, 1)), by.get((t, 2)), ppl.get(t)
            if b1 is None or b2 is None or p is None:
                continue
            lines.append(f"| {name} | {b1['mlp_flops_kept']:.3f} | {p:.2f} | {b1['dense_us']:.0f} / "
                         f"{b1['sparse_us']:.0f} | {b1['speedup']:.2f}x | {b2['speedup']:.2f}x | "
                         f"{b1['speedup_before']:.2f}x |")
    lines.append(f"\nCommand: `{g['command']}` (and the same with each conversion's record).")
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> list[str]:
    lines = ["| MLP kept | batch | dense tok/s | sparse tok/s | speedup |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kept']} | {r['batch']} | {r['dense_tok_s']:.1f} | {r['sparse_tok_s']:.1f} | "
                     f"{r['sparse_tok_s'] / r['dense_tok_s']:.2f}x |")
    return lines


def decode_lines(g: dict) -> list[str]:
    """The end-to-end decode table and the prefill lines of a GPU record."""
    lines = decode_table(g["decode"])
    if g.get("decode_compiled"):
        lines += ["", "The same steps with the whole model `torch.compile`d (fullgraph, dense and sparse alike, the "
                      "custom ops inside the compiled graph; key `decode_compiled`):", "",
                  *decode_table(g["decode_compiled"])]
    for r in g.get("prefill", []):
        lines.append(f"\nPrefill {r['tokens']} tokens at {r['kept']} kept: dense {r['dense_ms']:.2f} ms, sparse "
                     f"{r['sparse_ms']:.2f} ms ({r['dense_ms'] / r['sparse_ms']:.3f}x).")
    if g.get("profile_layer"):
        lines += ["", "Where a batch-1 layer's time goes (key `profile_layer`; random routers, expert size 8; kernel "
                      "times from torch.profiler, the call's time from a CUDA graph; gaps = graph - kernels):", "",
                  "| kept | path | dense us | sparse us (graph) | router kernels | gate/up | down | gaps |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in g["profile_layer"]:
            k = r["kernels_us"]
            router = sum(v for name, v in k.items() if name.startswith(("_r1", "_r2", "_select")))
            lines.append(f"| {r['target']} | {'compacted' if r['compact'] else 'neuron order'} | {r['dense_us']:.1f} "
                         f"| {r['graph_us']:.1f} | {router:.1f} | {k.get('_gate_up_kernel', 0):.1f} | "
                         f"{k.get('_down_kernel', 0):.1f} | {r['gaps_us']:.1f} |")
    return lines


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


# README block name -> (record, renderer); a block is rendered only where its record exists
BLOCKS = {
    "quality": ("quality-smollm2.json", quality_table),
    "quality-64k": ("quality-smollm2-wt2-64k-ours.json", quality_table),
    "quality-docs": ("quality-smollm2-python-docs.json", quality_table),
    "predictors": ("predictors-smollm2.json", predictors_table),
    "gpu": ("gpu-h100.json", gpu_table),
    "gpu-h200": ("gpu-h200.json", gpu_table),
    "gpu-sweep": ("gpu-h100-sweep.json", sweep_table),
    "gpu-size": ("gpu-h100-size-crossover.json", sweep_table),
    "gpu-dial-mix": ("gpu-h100-dial-mix.json", dial_mix_table),
}


def main():
    blocks = {name: render(json.loads((RESULTS / record).read_text()))
              for name, (record, render) in BLOCKS.items() if (RESULTS / record).exists()}
    for readme in (HERE / "README.md", HERE.parent / "README.md"):
        text = readme.read_text()
        for name, body in blocks.items():
            text = replace_block(text, name, body)
        readme.write_text(text)


if __name__ == "__main__":
    main()
