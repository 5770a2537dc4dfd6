"""Experiment, not in the product: can the gate dial's early decision or the per-token threshold be made smarter?

    python bench/decision_screens.py --sparse DIR [--budget 0.5] [--tokens 2048]

Every screen runs on calibration windows the conversion did not sample (drawn with its own seed from the far end
of its shuffled order; WikiText is never read), with each layer at its dials for --budget, on the inputs the sparse
model itself produces there. Errors are ||output error of the gate dial's drops||^2 / ||MLP output||^2, summed
over the layers that use the dial (down skip left out of every variant alike):
  variance   the same number of neurons kept per layer, scored by |act(g)| * gate_scale from the full gate (what
             early decisions give up), from the partial gate (ours), and by E|act(g_partial + sigma z)| with the
             unseen channels' spread sigma exact (sum of x_j^2 w_ij^2 over them: as dear as the full gate, a bound)
             or estimated cheaply (||x over them|| times the row's RMS weight)
  cascade    a first, cheaper decision on the top-|x| channels (quantile q_a) that drops the f_a lowest-scored
             neurons before the decision proper, against saving the same multiply-adds by raising the gate dial
  joint      deciding on |act(partial gate) * partial up| * ||down row|| over a smaller channel set, at the same
             gate + up multiply-adds as ours
  tokens     (dense model) how unequal the per-token loss sensitivity ||dLoss/dy_t||^2 at each MLP output is, and
             whether anything the MLP sees predicts it (the residual-stream norm; a ridge regression on the input):
             a per-token threshold pays only if it does
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import git_commit, load_conversion, unsampled_windows

from densesparse import __version__
from densesparse.arch import decoder_layers, resolve_layout
from densesparse.report import write_json
from densesparse.runtime import apply_budget, sparse_mlps

CASCADE = [(qa, fa) for qa in (0.85, 0.92) for fa in (0.2, 0.35, 0.5)]
JOINT = (0.7, 0.8, 0.87, 0.93)  # quantiles of |x| left out of the joint decision's channels
SAMPLE = 200_000  # entries a threshold quantile is taken from


def quantile(values: torch.Tensor, q: float, gen: torch.Generator) -> float:
    flat = values.flatten()
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=gen)]
    return float(torch.quantile(flat.float(), min(max(q, 0.0), 1.0)))


def expected_abs_act(act, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E|act(mu + sigma z)|, z standard normal (Gauss-Hermite, 12 nodes)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(12)
    weights = weights / weights.sum()
    return sum(float(w) * act(mu + sigma * float(z)).abs() for z, w in zip(nodes, weights))


class Layer:
    """One layer's inputs at its dials and what every screen needs from them."""

    def __init__(self, m, x: torch.Tensor):
        self.m, self.x = m, x.float()
        self.wg, self.wu, _, _, self.wdt, _ = (w.float() if w is not None else None for w in m.canonical())
        self.xs = m.sparse_input(self.x)
        self.dec = (self.x.abs() >= m.decide_tau) if m.deciding else self.xs != 0
        self.n_in = (self.xs != 0).sum(1, keepdim=True).double()
        self.n_dec = self.dec.sum(1, keepdim=True).double()
        self.h = m.act(self.xs @ self.wg.T) * (self.xs @ self.wu.T)
        self.yy = float((self.h @ self.wdt).pow(2).sum())
        self.s_dec = self.score(self.dec)
        self.keep = self.s_dec >= m.gate_tau

    def score(self, channels: torch.Tensor) -> torch.Tensor:
        return self.m.act((self.x * channels) @ self.wg.T).abs() * self.m.gate_scale

    def err(self, keep: torch.Tensor) -> float:
        return float(((self.h * ~keep) @ self.wdt).pow(2).sum()) / self.yy

    def top(self, score: torch.Tensor, frac: float, gen) -> torch.Tensor:
        return score >= quantile(score, 1 - frac, gen)


def variance_screen(L: Layer, gen) -> dict:
    m, kept = L.m, float(L.keep.double().mean())
    rest = L.xs * ~L.dec
    mu = (L.x * L.dec) @ L.wg.T
    sigma_exact = (rest.pow(2) @ L.wg.T.pow(2)).sqrt()
    sigma_cheap = rest.pow(2).sum(1, keepdim=True).sqrt() * L.wg.pow(2).mean(1).sqrt()[None]
    scores = {"full_gate": m.act(L.xs @ L.wg.T).abs(), "partial_gate": m.act(mu).abs(),
              "partial_exact_sigma": expected_abs_act(m.act, mu, sigma_exact),
              "partial_cheap_sigma": expected_abs_act(m.act, mu, sigma_cheap)}
    return {"kept": round(kept, 4), **{k: round(L.err(L.top(s * m.gate_scale, kept, gen)), 5)
                                       for k, s in scores.items()}}


def cascade_screen(L: Layer, gen) -> list[dict]:
    d, mm = L.x.shape[1], L.m.intermediate
    per_neuron = (L.n_in - L.n_dec) + L.n_in + d  # what one more dropped neuron saves: gate completion, up, down
    ours = (mm * L.n_dec + L.keep.sum(1, keepdim=True) * per_neuron).sum()
    base, dense = L.err(L.keep), L.x.shape[0] * 3 * d * mm
    out = []
    for qa, fa in CASCADE:
        first = L.x.abs() >= quantile(L.x.abs(), qa, gen)
        s_a = L.score(first)
        survive = s_a >= quantile(s_a, fa, gen)
        keep = L.keep & survive
        cost = (mm * first.sum(1, keepdim=True) + survive.sum(1, keepdim=True) * (L.n_dec - first.sum(1, keepdim=True))
                + keep.sum(1, keepdim=True) * per_neuron).sum()
        saved = float(ours - cost)
        more = saved / float(per_neuron.mean()) / max(int(L.keep.sum()), 1)
        raised = L.keep & (L.s_dec >= quantile(L.s_dec[L.keep], more, gen))
        out.append({"q_a": qa, "f_a": fa, "saved": round(saved / dense, 5),
                    "d_err_cascade": round(L.err(keep) - base, 5), "d_err_gate_dial": round(L.err(raised) - base, 5)})
    return out


def joint_screen(L: Layer, gen) -> dict:
    mm = L.m.intermediate
    kept = float(L.keep.sum(1).double().mean())
    n_in, n_dec = float(L.n_in.mean()), float(L.n_dec.mean())
    ours = mm * n_dec + kept * (n_in - n_dec) + kept * n_in  # gate + up multiply-adds per token
    row = {"ours": round(L.err(L.keep), 5)}
    norms = L.m.down_norms()
    for q in JOINT:
        channels = (L.x.abs() >= quantile(L.x.abs(), q, gen)) & (L.xs != 0)
        n_j = float(channels.sum(1).double().mean())
        k = (ours - 2 * mm * n_j) / (2 * (n_in - n_j))
        if k <= 0:
            row[str(q)] = None
            continue
        xj = L.x * channels
        s = (L.m.act(xj @ L.wg.T) * (xj @ L.wu.T)).abs() * norms
        row[str(q)] = round(L.err(L.top(s, k / mm, gen)), 5)
    return row


def token_screen(model, layout, ids: list[torch.Tensor]) -> list[dict]:
    """Per layer: the per-token ||dLoss/dy_t||^2 at the MLP output (dense model), its spread, the share the top 10%
    of tokens hold, its correlation with -2 log ||residual|| (the norm the next layers divide by) and the held-out
    R^2 / top-10% capture of a ridge regression of its log on the MLP input."""
    layers = decoder_layers(model, layout)
    grads, resid, inputs = ([[] for _ in layers] for _ in range(3))
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, a, i=i: resid[i].append(a[0][0].detach().norm(dim=-1))))

        def fwd(mod, a, out, i=i):
            inputs[i].append(a[0][0].detach().clone())
            out.register_hook(lambda g: grads[i].append(g[0].pow(2).sum(-1)))
        hooks.append(layer.mlp.register_forward_hook(fwd))
    try:
        with torch.enable_grad():
            for w in ids:
                emb = model.get_input_embeddings()(w[None]).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, :-1]
                torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i in range(len(layers)):
        g2, r = torch.cat(grads[i]).double(), torch.cat(resid[i]).double()
        x = torch.cat(inputs[i]).double()
        y = g2.clamp_min(1e-30).log()
        n = y.numel()
        train = torch.arange(n) < (3 * n) // 4
        xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
        ridge = 0.1 * n * xb[train].pow(2).mean() * torch.eye(xb.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(xb[train].T @ xb[train] + ridge, xb[train].T @ y[train])
        pred, test = xb[~train] @ w, y[~train]
        k = max(1, test.numel() // 10)
        top = g2[~train].topk(k).values.sum() / g2[~train].sum()
        rows.append({"layer": i, "cv": round(float(g2.std() / g2.mean()), 3),
                     "top10_share": round(float(g2.topk(max(1, n // 10)).values.sum() / g2.sum()), 3),
                     "corr_residual": round(float(torch.corrcoef(torch.stack([y, -2 * r.log()]))[0, 1]), 3),
                     "ridge_r2": round(1 - float((pred - test).pow(2).mean() / (test - test.mean()).pow(2).mean()), 3),
                     "ridge_top10_capture": round(float(g2[~train][pred.topk(k).indices].sum() / g2[~train].sum()), 3),
                     "oracle_top10_capture": round(float(top), 3)})
    return rows


def mlp_inputs(model, mlps, windows) -> list[torch.Tensor]:
    """Each SparseMLP's inputs [tokens, hidden] over the windows, as the (sparse) model runs them."""
    xs = [[] for _ in mlps]
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, m in enumerate(mlps)]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return [torch.cat(x) for x in xs]


def screen_setup(doc: str, out_name: str, add_args=None):
    """A screen's command line (--sparse, --budget, --tokens, --out, and what add_args(parser) adds) and what it runs
    on: (args, start time, commit, the conversion loaded at --budget, its spec, its held-out calibration windows)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if add_args:
        add_args(ap)
    ap.add_argument("--sparse", required=True, help="a default conversion (densesparse convert)")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=2048, help="held-out calibration tokens the screen runs on")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / out_name))
    args = ap.parse_args()
    started, commit = time.time(), git_commit()
    model, tok, spec = load_conversion(args.sparse, args.budget)
    return args, started, commit, model, spec, unsampled_windows(tok, spec, args.tokens)


def write_screen(doc: str, args, started: float, commit: str, held, fields: dict) -> None:
    """A screen's record at args.out: what ran, on which windows and machine, then its own fields."""
    write_json({"what": doc.splitlines()[0], "sparse": args.sparse, "budget": args.budget,
                "tokens": int(sum(w.numel() for w in held)),
                "text": "default calibration corpus, windows the conversion did not sample (its seed, far end)",
                "command": "python " + " ".join(sys.argv), "commit": commit,
                "versions": {"densesparse": __version__, "torch": torch.__version__,
                             "python": platform.python_version()},
                "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                "seconds": round(time.time() - started, 1), **fields}, args.out)


def main():
    args, started, commit, model, spec, held = screen_setup(__doc__, "decision-screens-smollm2.json")
    gen = torch.Generator().manual_seed(0)
    mlps = sparse_mlps(model)
    layers = []
    with torch.no_grad():
        for i, (m, x) in enumerate(zip(mlps, mlp_inputs(model, mlps, held))):
            if not m.gated or m.gate_tau <= 0:
                continue
            L = Layer(m, x)
            layers.append({"layer": i, "input_kept": round(float(L.n_in.mean()) / L.x.shape[1], 3),
                           "decision_channels": round(float(L.n_dec.mean()) / L.x.shape[1], 3),
                           "variance": variance_screen(L, gen), "cascade": cascade_screen(L, gen),
                           "joint": joint_screen(L, gen)})
            print(i, layers[-1]["variance"], layers[-1]["joint"], flush=True)
    apply_budget(mlps, spec["budgets"], 1.0)
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = token_screen(model, resolve_layout(model), held)
    summary = {"variance": {k: round(sum(r["variance"][k] for r in layers), 4)
                            for k in layers[0]["variance"] if k != "kept"} if layers else {},
               # saved: mean over the layers (a fraction of one layer's dense MLP); errors: sums, as above
               "cascade": [{"q_a": qa, "f_a": fa,
                            "saved": round(sum(r["cascade"][j]["saved"] for r in layers) / len(layers), 4),
                            **{k: round(sum(r["cascade"][j][k] for r in layers), 4)
                               for k in ("d_err_cascade", "d_err_gate_dial")}}
                           for j, (qa, fa) in enumerate(CASCADE)],
               "joint": {k: (round(sum(r["joint"][k] for r in layers), 4)
                             if all(r["joint"][k] is not None for r in layers) else None)
                         for k in ["ours"] + [str(q) for q in JOINT]},
               "tokens_mean": {k: round(sum(r[k] for r in tokens) / len(tokens), 3) for k in tokens[0] if k != "layer"}}
    write_screen(__doc__, args, started, commit, held, {"layers_with_gate_dial": len(layers), "summary": summary,
                                                       "layers": layers, "tokens_per_layer": tokens})
    print(summary)


if __name__ == "__main__":
    main()
