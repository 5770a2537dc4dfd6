"""Fit each layer's router to predict how much every expert would add to the FFN output (D2DMoE-style targets)."""
from __future__ import annotations

import math

import torch

from densesparse.runtime import SparseMLP, up_power_sum

CHUNK = 2048


@torch.no_grad()
def norms_from_hidden(mlp: SparseMLP, h: torch.Tensor) -> torch.Tensor:
    """||sum_{i in expert} h_i down_i|| for every expert and token [N, n_experts], via each expert's Gram matrix."""
    s, e, k = mlp.n_shared, mlp.expert_size, mlp.n_experts
    w = mlp.canonical()[4].float()[s:].reshape(k, e, -1)
    gram = w @ w.transpose(1, 2)
    he = h[:, s:].reshape(-1, k, e).transpose(0, 1)  # [k, N, e]: one batched product, twice einsum's speed here
    return (torch.bmm(he, gram) * he).sum(-1).T.clamp_min(0).sqrt()


@torch.no_grad()
def expert_output_norms(mlp: SparseMLP, x: torch.Tensor, gate_scale: str | None = None) -> torch.Tensor:
    """Every token's expert output norms [N, n_experts]; with gate_scale (a GATE_POWER statistic), gated FFNs also
    get their gate scale from the same pass (the up projections are most of the cost of both)."""
    statistic = gate_scale if mlp.gated else None
    norms, total = [], 0
    for xb in x.split(CHUNK):
        g, u = mlp.gate_and_up(xb.float())
        if statistic:
            total = total + up_power_sum(u, statistic)
        norms.append(norms_from_hidden(mlp, u if g is None else g * u))
    if statistic:
        mlp.set_gate_scale(total, x.shape[0], statistic)
    return torch.cat(norms)


def fit_router(mlp: SparseMLP, x: torch.Tensor, epochs: int, generator: torch.Generator,
               batch: int = 1024, lr: float = 3e-3, norms: torch.Tensor | None = None) -> float:
    """Train the router so softmax(logits) matches each token's distribution of expert output norms (KL).

    Matching the normalised norms is exactly what the threshold rule consumes: router mass ~ share of the output.
    norms: expert_output_norms(mlp, x), where already computed. Returns the final training loss.
    """
    if norms is None:
        norms = expert_output_norms(mlp, x)
    target = norms / norms.sum(1, keepdim=True).clamp_min(1e-12)
    router = mlp.router.float()
    with torch.no_grad():
        for lin in (router.w1, router.w2):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=generator))
            lin.bias.zero_()
        router.w2.bias.copy_(torch.log(target.mean(0).clamp_min(1e-9)))
    opt = torch.optim.Adam(router.parameters(), lr=lr, foreach=True)
    steps = epochs * math.ceil(x.shape[0] / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    with torch.enable_grad():
        return _train(router, x.float(), target, opt, sched, epochs, batch, generator)


def _train(router, x, target, opt, sched, epochs, batch, generator) -> float:
    # the targets' own entropy is constant: the cross-entropy has the KL's gradient, and the KL is reported
    neg_entropy = (target * torch.log(target.clamp_min(1e-12))).sum(1)
    loss_value = float("nan")
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=generator).split(batch):
            logp = torch.log_softmax(router(x[idx]), dim=-1)
            loss = -(target[idx] * logp).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.detach() + neg_entropy[idx].mean())
    return loss_value
