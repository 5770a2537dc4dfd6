"""Streaming calibration statistics: forward hooks keep, per FFN, a sample of its inputs in memory.

Everything conversion needs (co-activation profiles, router targets, threshold curves) is a function of the FFN
input and the layer's own weights, so a sample of inputs is the one statistic kept; nothing goes to disk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress

from densesparse.arch import FFNLayout, decoder_layers, get_attr

SENSITIVITY_WINDOWS = 8


@dataclass
class LayerSample:
    x: torch.Tensor  # [N, d] FFN inputs, bfloat16 to halve the memory
    weight: float  # loss sensitivity: mean squared gradient of the LM loss w.r.t. this FFN's output, per token


def ffn_input_module(layer, layout: FFNLayout):
    """The module whose input is the FFN input: the MLP container, or the first projection of an inline FFN."""
    return get_attr(layer, layout.container) if layout.container else getattr(layer, layout.up)


def ffn_output_module(layer, layout: FFNLayout):
    return get_attr(layer, layout.container) if layout.container else getattr(layer, layout.down)


def layer_sensitivity(model, layout: FFNLayout, batches: list[torch.Tensor]) -> list[float]:
    """Per FFN, E_t ||dLoss/dy_t||^2: a diagonal-Fisher weight that turns an FFN output error into a loss increase
    (for an error d, about ||g||^2 ||d||^2 / hidden), so layers' errors can be traded against each other."""
    layers = decoder_layers(model, layout)
    acc = [0.0] * len(layers)
    tokens = 0

    def hook(i):
        def fwd(_module, _args, out):
            out.register_hook(lambda g: acc.__setitem__(i, acc[i] + float(g.float().pow(2).sum())))
        return fwd

    hooks = [ffn_output_module(layer, layout).register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for ids in batches:
                emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, :-1].float()
                torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").backward()
                tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    return [a / max(tokens, 1) for a in acc]


@torch.no_grad()
def collect(model, layout: FFNLayout, batches: list[torch.Tensor], progress: Progress | None = None,
            sensitivity: bool = True) -> list[LayerSample]:
    """Every FFN's inputs on the windows, and (sensitivity) each layer's loss sensitivity from backward passes on the
    first windows; without it every weight is 1 (the loss probe measures each layer's weight itself, and a common
    weight cancels in its ratios)."""
    layers = decoder_layers(model, layout)
    total = sum(b.numel() for b in batches)
    d = model.config.hidden_size
    xs = [torch.empty(total, d, dtype=torch.bfloat16) for _ in layers]
    fill = [0 for _ in layers]
    hooks = []

    def ffn_hook(i):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, d)
            xs[i][fill[i]:fill[i] + x.shape[0]] = x.to(torch.bfloat16)
            fill[i] += x.shape[0]
        return hook

    for i, layer in enumerate(layers):
        hooks.append(ffn_input_module(layer, layout).register_forward_pre_hook(ffn_hook(i)))
    task = progress.add_task("calibration forward", total=len(batches)) if progress else None
    try:
        # the sensitivity pass's forwards fill the first windows' samples: no second forward for them
        first = SENSITIVITY_WINDOWS if sensitivity else 0
        weights = layer_sensitivity(model, layout, batches[:first]) if first else [1.0] * len(layers)
        if progress:
            progress.advance(task, min(first, len(batches)))
        for ids in batches[first:]:
            model.base_model(input_ids=ids.unsqueeze(0), use_cache=False)  # the LM head is not needed
            if progress:
                progress.advance(task)
    finally:
        for h in hooks:
            h.remove()
    return [LayerSample(x=x[:n], weight=w) for x, w, n in zip(xs, weights, fill)]
