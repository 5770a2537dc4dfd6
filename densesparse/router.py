"""Fit each layer's router to predict how much every expert would add to the FFN output (D2DMoE-style targets)."""
from __future__ import annotations

import math

import torch

from densesparse.runtime import SparseMLP

CHUNK = 2048


@torch.no_grad()
def norms_from_hidden(mlp: SparseMLP, h: torch.Tensor) -> torch.Tensor:
    """||sum_{i in expert} h_i down_i|| for every expert and token [N, n_experts], via each expert's Gram matrix."""
    s, e, k = mlp.n_shared, mlp.expert_size, mlp.n_experts
    w = mlp.canonical()[4].float()[s:].reshape(k, e, -1)
    gram = w @ w.transpose(1, 2)
    he = h[:, s:].reshape(-1, k, e)
    return torch.einsum("bke,kef,bkf->bk", he, gram, he).clamp_min(0).sqrt()


@torch.no_grad()
def expert_output_norms(mlp: SparseMLP, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([norms_from_hidden(mlp, mlp.hidden_states(xb.float())) for xb in x.split(CHUNK)])


def fit_router(mlp: SparseMLP, x: torch.Tensor, epochs: int, generator: torch.Generator,
               batch: int = 1024, lr: float = 3e-3) -> float:
    """Train the router so softmax(logits) matches each token's distribution of expert output norms (KL).

    Matching the normalised norms is exactly what the threshold rule consumes: router mass ~ share of the output.
    Returns the final training loss.
    """
    norms = expert_output_norms(mlp, x)
    target = norms / norms.sum(1, keepdim=True).clamp_min(1e-12)
    router = mlp.router.float()
    with torch.no_grad():
        for lin in (router.w1, router.w2):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=generator))
            lin.bias.zero_()
        router.w2.bias.copy_(torch.log(target.mean(0).clamp_min(1e-9)))
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    steps = epochs * math.ceil(x.shape[0] / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    loss_value = float("nan")
    with torch.enable_grad():
        loss_value = _train(router, x, target, opt, sched, epochs, batch, generator)
    return loss_value


def _train(router, x, target, opt, sched, epochs, batch, generator) -> float:
    loss_value = float("nan")
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=generator).split(batch):
            logp = torch.log_softmax(router(x[idx].float()), dim=-1)
            tgt = target[idx]
            loss = (tgt * (torch.log(tgt.clamp_min(1e-12)) - logp)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
    return loss_value
