"""Tiny random models (hidden 32, 2 layers) for every architecture row, and a tiny offline tokenizer."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from densesparse.arch import LAYOUTS
from densesparse.data import CALIBRATION_DIR

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)

# One entry per architecture row in densesparse.arch.LAYOUTS: (config class, its kwargs).
TINY = {
    "LlamaForCausalLM": (tf.LlamaConfig, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **_COMMON)),
    "MistralForCausalLM": (tf.MistralConfig, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                  **_COMMON)),
    "Qwen2ForCausalLM": (tf.Qwen2Config, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                              **_COMMON)),
    "Qwen3ForCausalLM": (tf.Qwen3Config, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                              head_dim=8, **_COMMON)),
    "GemmaForCausalLM": (tf.GemmaConfig, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                              head_dim=8, **_COMMON)),
    "Gemma2ForCausalLM": (tf.Gemma2Config, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                head_dim=8, **_COMMON)),
    "Gemma3ForCausalLM": (tf.Gemma3TextConfig, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                    head_dim=8, **_COMMON)),
    "Phi3ForCausalLM": (tf.Phi3Config, dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                            pad_token_id=0, **_COMMON)),
    "GPT2LMHeadModel": (tf.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512)),
    "OPTForCausalLM": (tf.OPTConfig, dict(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1,
                                          max_position_embeddings=512, **_COMMON)),
    "GPTNeoXForCausalLM": (tf.GPTNeoXConfig, dict(hidden_size=32, intermediate_size=64, **_COMMON)),
}
assert set(TINY) == set(LAYOUTS), "every architecture row needs a tiny test model"


def tiny_model(name: str, seed: int = 0):
    cfg_cls, kwargs = TINY[name]
    config = cfg_cls(**kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # local: fork_rng restores the global state afterwards
        model = getattr(tf, name)(config)
        # random init leaves norms at 1 and biases at 0; perturb every parameter so permutations are really tested
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def kl_from_dense(model, mlps, budgets, target, wins) -> float:
    """KL(dense || sparse at target) per token over wins (the model at the dense budget gives the reference)."""
    from densesparse.budget import kl_per_token, reference
    from densesparse.runtime import apply_budget

    apply_budget(mlps, budgets, 1.0)
    with torch.no_grad():
        dense = [reference(model, w) for w in wins]
    apply_budget(mlps, budgets, target)
    return kl_per_token(model, wins, dense)


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(CALIBRATION_DIR / "hamlet.txt")], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(params=sorted(TINY))
def arch(request):
    return request.param


@pytest.fixture
def tiny_dir(tmp_path, tokenizer, arch):
    """A saved tiny model directory (safetensors + tokenizer) of the parametrized architecture."""
    model = tiny_model(arch)
    path = tmp_path / f"tiny-{arch}"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
