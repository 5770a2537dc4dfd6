"""End-to-end refinement of the bias corrections at chosen budgets (`--distill-steps`).

The bias correction (budget.set_budget_biases) removes each layer's mean output error layer by layer, on that
layer's own output. This step then fits, per chosen budget, an additive correction to every layer's bias at once by
minimising the KL divergence of the sparse model's next-token distribution from the dense model's on calibration
windows: the biases learn what the layer-local mean cannot see (which directions of the residual stream the loss is
sensitive to, and the errors other layers leave). It changes only the stored bias rows, so the forward (CPU or
Triton) costs the same.

Forward and backward run in float32 on the CPU (the same numbers on every CPU; where the CPU has no bfloat16
matrix units, bfloat16 is several times slower there) and under bfloat16 autocast on CUDA (there every layer computes
the sparse function, never the dense MLP that many-token calls otherwise take, and the layers that need a gradient run
their torch path, since the kernels have no backward); the biases and their updates stay float32.
"""
from __future__ import annotations

import statistics

import torch

from densesparse.budget import Reference, forward_hooks, same_budget
from densesparse.runtime import SparseMLP, apply_budget, sparse_function

# Adam step on each bias entry, relative to the median over layers of the dense MLP outputs' RMS (so the step
# follows the model's scale): 0.01 on SmolLM2-135M (median RMS 1.83). Twice the first value tried, for the 10 default
# steps: on held-out calibration KL, 10 steps at this size kept more of 20 steps' gain than 8 at 2.5x, and twice it
# again was worse at 35% than no refinement (bench/results/distill-screen-smollm2.json)
LR = 0.0054


def budget_row(budgets: list[dict], target: float) -> int | None:
    """Index of the calibrated budget row at `target` (None if the grid has none there)."""
    return next((i for i, b in enumerate(budgets) if same_budget(b["target"], target)), None)


def _median_output_rms(model, mlps: list[SparseMLP], ids: torch.Tensor) -> float:
    rms = []
    with forward_hooks(mlps, lambda i: lambda mod, a, out: rms.append(float(out.float().pow(2).mean().sqrt()))), \
            torch.no_grad():
        model(input_ids=ids[None], use_cache=False)
    return statistics.median(rms)


def _logits(model, ids: torch.Tensor, grad: bool, bf16: bool) -> torch.Tensor:
    """[1, T, vocab]: backward runs on the model's own output (no vocab-wide copy for an index's gradient)."""
    with torch.set_grad_enabled(grad), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=ids[None], use_cache=False).logits


def distill_biases(model, mlps: list[SparseMLP], budgets: list[dict], windows: list[torch.Tensor],
                   targets: list[float], steps: int, generator: torch.Generator, lr: float = LR,
                   per_step: int = 1, bf16: bool | None = None, on_step=None) -> list[dict]:
    """For each target (a row of `budgets`), `steps` Adam steps on an additive correction to every layer's bias row,
    each step on `per_step` calibration windows drawn with `generator` (step size lr x the median RMS of the dense
    MLP outputs on the first window), on the gradient of KL(dense || sparse) per token, taken on the logits as
    softmax(sparse) - softmax(dense). The targets step together on the same windows, so each window's dense pass
    serves all of them. bf16: bfloat16 autocast (default: on CUDA only). The rows then hold bias + correction.
    Returns, per target, the mean KL over the first and the last few steps (a training-loss trace, not a held-out
    check)."""
    device = next(model.parameters()).device
    bf16 = device.type == "cuda" if bf16 is None else bf16
    params = list(model.parameters())  # frozen meanwhile: only the corrections get gradients
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        apply_budget(mlps, budgets, 1.0)
        step_size = lr * _median_output_rms(model, mlps, windows[0].to(device))
        deltas = [[torch.zeros(m.hidden, device=device, requires_grad=True) for m in mlps] for _ in targets]
        opts = [torch.optim.Adam(d, lr=step_size) for d in deltas]
        kls = [[] for _ in targets]
        on = {"t": None}  # the target whose corrections are added to the MLP outputs (None: the dense passes)
        # on CUDA, sparse_function keeps many-token calls off the dense MLP in every layer (those needing a gradient
        # run the torch path: the kernels have no backward)
        with sparse_function(mlps), forward_hooks(mlps, lambda i: lambda mod, a, out: out if on["t"] is None
                                                  else out + deltas[on["t"]][i].to(out.dtype)):
            for _ in range(steps):
                picks = torch.randint(len(windows), (per_step,), generator=generator).tolist()
                n = sum(windows[i].numel() for i in picks)
                for opt in opts:
                    opt.zero_grad()
                kl = [0.0] * len(targets)
                for i in picks:
                    ids = windows[i].to(device)
                    apply_budget(mlps, budgets, 1.0)
                    on["t"] = None
                    dense = Reference.of(_logits(model, ids, False, bf16)[0])
                    for t, target in enumerate(targets):
                        apply_budget(mlps, budgets, target)
                        on["t"] = t
                        z = _logits(model, ids, True, bf16)
                        with torch.no_grad():
                            kl_t, grad = dense.kl_and_grad(z[0], n)
                        kl[t] += kl_t
                        z.backward(grad[None].to(z.dtype))
                for t, opt in enumerate(opts):
                    opt.step()
                    kls[t].append(kl[t] / n)
                if on_step:
                    on_step()
        with torch.no_grad():
            for target, ds in zip(targets, deltas):
                row = budget_row(budgets, target)
                for m, d in zip(mlps, ds):
                    m.budget_bias[row] += d.to(m.budget_bias.dtype)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    k = max(1, min(5, steps // 4))
    return [{"target": target, "kl_first_steps": round(sum(trace[:k]) / k, 5),
             "kl_last_steps": round(sum(trace[-k:]) / k, 5)} for target, trace in zip(targets, kls)]
