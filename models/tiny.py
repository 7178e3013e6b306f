"""Tiny random-init models for tests and quick demos, in the style of transformers' own test suite.

Each is built from a small config (hidden 64, 2 layers) with seed 0, so two loads give the same
weights. They share the embedded minilm tokenizer, with the config's vocab size set to match it.
"""
from __future__ import annotations

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)),
    "tiny-mistral": ("mistral", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "tiny-qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512)),
    "tiny-opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64)),
    "tiny-bert": ("bert", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4)),
    "tiny-mixtral": ("mixtral", dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    num_local_experts=4, num_experts_per_tok=2)),
}


def tiny_config(name: str, tokenizer):
    from transformers import AutoConfig

    model_type, kwargs = TINY_CONFIGS[name]
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id)
    if model_type != "gpt2":
        kwargs = dict(max_position_embeddings=512, **kwargs)
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **ids, **kwargs)
