"""Streaming calibration statistics: forward hooks keep, per FFN, a sample of its inputs in memory.

Everything conversion needs (co-activation profiles, router targets, threshold curves) is a function of the FFN
input and the layer's own weights, so a sample of inputs is the one statistic kept; nothing goes to disk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress

from densesparse.arch import FFNLayout, decoder_layers, get_attr


@dataclass
class LayerSample:
    x: torch.Tensor  # [N, d] FFN inputs, bfloat16 to halve the memory
    resid_sq: float  # mean squared norm of the residual stream entering the layer (error scale)


def ffn_input_module(layer, layout: FFNLayout):
    """The module whose input is the FFN input: the MLP container, or the first projection of an inline FFN."""
    return get_attr(layer, layout.container) if layout.container else getattr(layer, layout.up)


@torch.no_grad()
def collect(model, layout: FFNLayout, batches: list[torch.Tensor], progress: Progress | None = None
            ) -> list[LayerSample]:
    layers = decoder_layers(model, layout)
    total = sum(b.numel() for b in batches)
    d = model.config.hidden_size
    xs = [torch.empty(total, d, dtype=torch.bfloat16) for _ in layers]
    resid = [0.0 for _ in layers]
    fill = [0 for _ in layers]
    hooks = []

    def ffn_hook(i):
        def hook(_module, args):
            x = args[0].reshape(-1, d)
            xs[i][fill[i]:fill[i] + x.shape[0]] = x.to(torch.bfloat16)
            fill[i] += x.shape[0]
        return hook

    def layer_hook(i):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            resid[i] += float(h.float().pow(2).sum())
        return hook

    for i, layer in enumerate(layers):
        hooks.append(ffn_input_module(layer, layout).register_forward_pre_hook(ffn_hook(i)))
        hooks.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
    task = progress.add_task("calibration forward", total=len(batches)) if progress else None
    try:
        for ids in batches:
            model.base_model(input_ids=ids.unsqueeze(0), use_cache=False)  # the LM head is not needed
            if progress:
                progress.advance(task)
    finally:
        for h in hooks:
            h.remove()
    return [LayerSample(x=x[:n], resid_sq=r / max(n, 1)) for x, r, n in zip(xs, resid, fill)]
