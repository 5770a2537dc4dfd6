"""Architectures as data: where each model family keeps its FFN and how its weights are laid out.

Adding a model is one row in LAYOUTS (and one parametrization in tests/conftest.py).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from densesparse.errors import DenseSparseError


class UnsupportedArchitecture(DenseSparseError):
    pass


@dataclass(frozen=True)
class FFNLayout:
    layers: str  # attribute path from the CausalLM to the list of decoder layers
    container: str  # attribute of a decoder layer holding the FFN ("" = the FFN lives inline in the layer)
    up: str  # name of the input projection (fc1 / up_proj / fused gate_up_proj)
    down: str  # name of the output projection
    gate: str | None = None  # separate gate projection; None for non-gated or fused layouts
    fused_gate_up: bool = False  # one [2m, d] projection: first half gate, second half up (Phi-3)
    conv1d: bool = False  # GPT-2 Conv1D: weight stored [in, out] instead of nn.Linear's [out, in]
    act_attr: str = "hidden_act"  # config attribute naming the activation
    act_slot: str | None = None  # layer attribute holding the activation module, for inline FFNs

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up

    def to_dict(self) -> dict:
        return asdict(self)


_LLAMA = FFNLayout(layers="model.layers", container="mlp", up="up_proj", gate="gate_proj", down="down_proj")
_GEMMA = FFNLayout(layers="model.layers", container="mlp", up="up_proj", gate="gate_proj", down="down_proj",
                   act_attr="hidden_activation")

LAYOUTS: dict[str, FFNLayout] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "GemmaForCausalLM": _GEMMA,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
    "Phi3ForCausalLM": FFNLayout(layers="model.layers", container="mlp", up="gate_up_proj", down="down_proj",
                                 fused_gate_up=True),
    "GPT2LMHeadModel": FFNLayout(layers="transformer.h", container="mlp", up="c_fc", down="c_proj", conv1d=True,
                                 act_attr="activation_function"),
    "OPTForCausalLM": FFNLayout(layers="model.decoder.layers", container="", up="fc1", down="fc2",
                                act_attr="activation_function", act_slot="activation_fn"),
    "GPTNeoXForCausalLM": FFNLayout(layers="gpt_neox.layers", container="mlp", up="dense_h_to_4h",
                                    down="dense_4h_to_h"),
}

# Fallback for classes not in the table: a Llama-like gated MLP under model.layers.*.mlp.
_PATTERN = re.compile(r"^model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)$")


def get_attr(obj, path: str):
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def resolve_layout(model) -> FFNLayout:
    name = type(model).__name__
    if name in LAYOUTS:
        return LAYOUTS[name]
    found = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if _PATTERN.match(n)}
    if found == {"gate_proj", "up_proj", "down_proj"}:
        return _LLAMA
    supported = ", ".join(sorted(LAYOUTS))
    raise UnsupportedArchitecture(
        f"unsupported architecture {name}: densesparse knows {supported}; add a row to densesparse/arch.py LAYOUTS")


def decoder_layers(model, layout: FFNLayout):
    return list(get_attr(model, layout.layers))


def activation_name(config, layout: FFNLayout) -> str:
    # Gemma configs name the activation in hidden_activation but older ones only set hidden_act.
    name = getattr(config, layout.act_attr, None) or getattr(config, "hidden_act", None)
    if name is None:
        raise UnsupportedArchitecture(f"config has no {layout.act_attr}: cannot tell the FFN activation")
    return name
