"""Group each FFN's neurons into experts and make every expert a contiguous block by permuting the weights."""
from __future__ import annotations

import math

import torch

from densesparse.runtime import SparseMLP

PROFILE_TOKENS = 4096


@torch.no_grad()
def contributions(mlp: SparseMLP, x: torch.Tensor) -> torch.Tensor:
    """|h_i| * ||down_i||: how much each neuron adds to the FFN output, per token [T, m]."""
    h = mlp.hidden_states(x.float())
    return h.abs() * mlp.down_norms()


def balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each of n points to one of k clusters of exactly `size` points, nearest first (greedy rounds)."""
    n, k = dist.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), size, dtype=torch.long)
    while (assign < 0).any():
        todo = (assign < 0).nonzero().squeeze(1)
        d = dist[todo].clone()
        d[:, room == 0] = float("inf")
        choice = d.argmin(1)
        best = d.gather(1, choice[:, None]).squeeze(1)
        order = torch.argsort(best, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        chosen = choice[order]
        first = torch.searchsorted(chosen, chosen, right=False)
        rank = torch.arange(len(order)) - first
        ok = rank < room[chosen]
        assign[todo[order[ok]]] = chosen[ok]
        room -= torch.bincount(chosen[ok], minlength=k)
    return assign


def kmeans_plusplus(feats: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, with scikit-learn's 2 + ln k candidates per step, keeping
    the one that lowers the potential most): the indices of k points to start from."""
    n = feats.shape[0]
    gram = feats @ feats.T  # once: the k steps then read rows of it instead of multiplying by every point again
    sq = gram.diagonal()

    def dist2(idx: torch.Tensor) -> torch.Tensor:  # squared distances from points idx to every point [len(idx), n]
        return (sq[idx, None] - 2 * gram[idx] + sq[None]).clamp_min(0)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = dist2(torch.tensor(chosen))[0]
    for _ in range(1, k):
        # a point is a candidate with probability proportional to its squared distance to the nearest centre
        cand = torch.multinomial(closest.clamp_min(1e-12), 2 + int(math.log(k)), replacement=True,
                                 generator=generator)
        d = torch.minimum(closest[None], dist2(cand))
        best = int(d.sum(1).argmin())
        chosen.append(int(cand[best]))
        closest = d[best]
    return torch.tensor(chosen)


def balanced_kmeans(feats: torch.Tensor, k: int, size: int, generator: torch.Generator, iters: int = 12
                    ) -> torch.Tensor:
    """Balanced k-means on unit-normalised features (cosine geometry); returns a cluster id per point."""
    feats = torch.nn.functional.normalize(feats.float(), dim=1)
    centers = feats[kmeans_plusplus(feats, k, generator)]
    assign = None
    for _ in range(iters):
        new = balanced_assign(1.0 - feats @ centers.T, size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centers = torch.zeros_like(centers).index_add_(0, assign, feats)
        centers = torch.nn.functional.normalize(centers, dim=1)
    return assign


@torch.no_grad()
def neuron_order(mlp: SparseMLP, x: torch.Tensor, method: str, generator: torch.Generator) -> torch.Tensor:
    """The permutation that puts the shared neurons first, then each expert's neurons contiguously."""
    sample = x[torch.randperm(x.shape[0], generator=generator)[:PROFILE_TOKENS]]
    contrib = contributions(mlp, sample)
    m = contrib.shape[1]
    by_mass = torch.argsort(contrib.mean(0), descending=True)
    shared = by_mass[:mlp.n_shared]
    rest = torch.sort(by_mass[mlp.n_shared:]).values
    if method == "contiguous":
        return torch.cat([shared, rest])
    if method == "coactivation":
        feats = contrib[:, rest].T
    else:
        w_gate, w_up = mlp.canonical()[:2]
        feats = torch.cat([w_up, w_gate], 1)[rest] if w_gate is not None else w_up[rest]
    k = mlp.n_experts
    if k == 1:
        return torch.cat([shared, rest])
    cluster = balanced_kmeans(feats, k, mlp.expert_size, generator)
    # experts ordered by their mean contribution, each expert's neurons in original order: deterministic layout
    mass = torch.zeros(k).index_add_(0, cluster, contrib[:, rest].mean(0))
    expert_rank = torch.argsort(torch.argsort(mass, descending=True))
    key = expert_rank[cluster] * m + rest
    return torch.cat([shared, rest[torch.argsort(key)]])


@torch.no_grad()
def permute(mlp: SparseMLP, order: torch.Tensor) -> None:
    """Reorder neurons in place: rows of up/gate and columns of down, so the function is unchanged."""
    w_gate, w_up, b_gate, b_up, w_down_t, _ = mlp.canonical()
    for t in (w_gate, w_up, b_gate, b_up, w_down_t):
        if t is not None:
            t.copy_(t[order].clone())
