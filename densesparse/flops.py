"""Multiply-add counts per token (a FLOP here is one multiply-add, the convention of the issue and the peers)."""
from __future__ import annotations

from torch import nn


def mlp_macs_dense(d: int, m: int, gated: bool) -> float:
    return float(d * m * (3 if gated else 2))


def mlp_macs_sparse(d: int, gate_cells, up_cells, down_neurons, router):
    """Per token: router + gate and up (rows computed x input channels used, each) + down rows actually used
    (floats, or tensors of them: the budget search counts a grid at once)."""
    return router + gate_cells + up_cells + d * down_neurons


def _is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _weight_macs(module) -> int:
    return module.weight.numel()


def non_mlp_macs(model, mlp_modules: list) -> float:
    """Attention projections and the LM head: every Linear/Conv1D outside the FFNs (routers excluded too)."""
    skip = set()
    for mlp in mlp_modules:
        skip.update(id(m) for m in mlp.modules())
        skip.update(id(p) for p in mlp.parameters())
    total = 0
    for module in model.modules():
        if id(module) in skip or not _is_projection(module) or id(module.weight) in skip:
            continue
        total += _weight_macs(module)
    return float(total)


def attention_macs(config, context: float) -> float:
    """QK^T and AV per token, at `context` attended positions on average, over all layers."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return float(2 * config.num_hidden_layers * heads * head_dim * context)
