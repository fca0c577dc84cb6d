"""Regenerate the ready configs of published ANEMLL releases in this folder.

    python configs/make_configs.py

Dimensions are those of the source checkpoints (config.json of each); file
names follow ANEMLL's layout for the release's LUT settings.
"""
from pathlib import Path

from anemll_fast.layout import anemll_config

HERE = Path(__file__).resolve().parent

RELEASES = {
    "anemll-qwen3-0.6b-ctx512-0.3.4": dict(
        prefix="qwen", hidden_size=1024, num_layers=28, num_kv_heads=8, head_dim=128,
        vocab_size=151936, context_length=512, batch_size=64, num_chunks=1, split_lm_head=16,
        lut_ffn=4, lut_lmhead=6,
        model_info={"model_id": "anemll/anemll-Qwen-Qwen3-0.6B-ctx512_0.3.4", "anemll_version": "0.3.4"},
    ),
    "anemll-qwen3-0.6b-lut888-ctx512-0.3.4": dict(
        prefix="qwen", hidden_size=1024, num_layers=28, num_kv_heads=8, head_dim=128,
        vocab_size=151936, context_length=512, batch_size=64, num_chunks=1, split_lm_head=16,
        lut_embeddings=8, lut_ffn=8, lut_lmhead=8,
        model_info={"model_id": "anemll/anemll-Qwen-Qwen3-0.6B-LUT888-ctx512_0.3.4", "anemll_version": "0.3.4"},
    ),
    "anemll-qwen2.5-0.5b-ctx512-0.3.4": dict(
        prefix="qwen25", hidden_size=896, num_layers=24, num_kv_heads=2, head_dim=64,
        vocab_size=151936, context_length=512, batch_size=64, num_chunks=1, split_lm_head=16,
        lut_ffn=4, lut_lmhead=6,
        model_info={"model_id": "anemll/anemll-Qwen-Qwen2.5-0.5B-Instruct-ctx512_0.3.4", "anemll_version": "0.3.4"},
    ),
    # Gemma 3 (ANEMLL 0.3.5): every 6th layer global, the others a 512-position sliding window.
    "anemll-gemma-3-1b-ctx4096-0.3.5": dict(
        prefix="gemma3", hidden_size=1152, num_layers=26, num_kv_heads=1, head_dim=256,
        vocab_size=262144, context_length=4096, batch_size=64, num_chunks=1, split_lm_head=16,
        lut_ffn=6, lut_lmhead=6, sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
        model_info={"model_id": "anemll/anemll-google-gemma-3-1b-it-ctx4096_0.3.4", "anemll_version": "0.3.5",
                    "note": "LUT 6 as ANEMLL's docs/compile_models.md example gemma3_1b_lut6_ctx4096; "
                            "one FFN chunk assumed"},
    ),
    "anemll-gemma-3-270m-monolithic-argmax-ctx512-0.3.5": dict(
        prefix="gemma3", hidden_size=640, num_layers=18, num_kv_heads=1, head_dim=256,
        vocab_size=262144, context_length=512, batch_size=64, num_chunks=1, split_lm_head=16,
        lut_ffn=4, monolithic=True, argmax_in_model=True, sliding_window=512,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
        model_info={"model_id": "gemma3_270m_lut4_ctx512", "anemll_version": "0.3.5",
                    "note": "as ANEMLL's docs/compile_models.md converts it: convert_monolith.sh --context 512 "
                            "--batch 64 --lut 4 --prefix gemma3 --argmax"},
    ),
    "anemll-llama-3.2-1b-ctx512-0.3.4": dict(
        prefix="llama", hidden_size=2048, num_layers=16, num_kv_heads=8, head_dim=64,
        vocab_size=128256, context_length=512, batch_size=64, num_chunks=2, split_lm_head=8,
        lut_ffn=4, lut_lmhead=6,
        model_info={"model_id": "anemll/anemll-Meta-Llama-3.2-1B-ctx512_0.3.4", "anemll_version": "0.3.4"},
    ),
}


def build_all():
    return {name: anemll_config(**kwargs) for name, kwargs in RELEASES.items()}


if __name__ == "__main__":
    for name, config in build_all().items():
        config.to_json(HERE / f"{name}.json")
        print("wrote", name)
