"""Tiny random models of the decoder families a TRL user trains, built from transformers' own configs (no download).

`FAMILIES` maps a name to `(model_type, config overrides)`: every model is 64 wide with 4 query and 2 key/value heads of
16 dimensions, a 32768-token vocabulary (the Mistral tokenizer's), initial weights large enough (`initializer_range`
0.1) that a leak between completions shows in the log-probs, and sliding windows of 8 tokens, shorter than the test's
segments. Hybrid families get layers of each kind they have (attention and SSM / convolution / linear attention).
"""

from __future__ import annotations

WIDTH = dict(
    vocab_size=32768, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    initializer_range=0.1, max_position_embeddings=512, tie_word_embeddings=False,
)
WINDOW = 8
_MAMBA = dict(mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
              mamba_chunk_size=16)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_GEMMA_LAYERS = ["sliding_attention", "full_attention"] * 2
_DEEPSEEK_MOE = dict(moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                     first_k_dense_replace=1, n_group=1, topk_group=1)
# Multi-head latent attention: queries and keys of 16 + 8 (rotary) dimensions, values of 16, one key/value head each
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16)

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(num_hidden_layers=2)),
    "mistral": ("mistral", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "mixtral": ("mixtral", dict(num_hidden_layers=2, sliding_window=WINDOW, **_MOE)),
    "qwen2": ("qwen2", dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("qwen3", dict(num_hidden_layers=2)),
    "qwen3_sliding": ("qwen3", dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1)),
    "ministral": ("ministral", dict(num_hidden_layers=2, sliding_window=WINDOW,
                                    layer_types=["sliding_attention", "full_attention"])),
    "qwen2_moe": ("qwen2_moe", dict(num_hidden_layers=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                    num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("qwen3_moe", dict(num_hidden_layers=2, moe_intermediate_size=32, num_experts=4,
                                    num_experts_per_tok=2, use_sliding_window=True, sliding_window=WINDOW)),
    "phi3": ("phi3", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "gemma": ("gemma", dict(num_hidden_layers=2)),
    "gemma2": ("gemma2", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=2, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"])),
    "gpt_oss": ("gpt_oss", dict(num_hidden_layers=2, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["sliding_attention", "full_attention"])),
    "cohere2": ("cohere2", dict(num_hidden_layers=2, sliding_window=WINDOW,
                                layer_types=["sliding_attention", "full_attention"])),
    "olmo2": ("olmo2", dict(num_hidden_layers=2)),
    "granite": ("granite", dict(num_hidden_layers=2, attention_multiplier=0.3, residual_multiplier=0.5)),
    "starcoder2": ("starcoder2", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "olmo3": ("olmo3", dict(num_hidden_layers=2, sliding_window=WINDOW,
                            layer_types=["sliding_attention", "full_attention"])),
    # Attention-only families added with the guard of `shared_prompt_forward`; each config turns on what its family
    # adds to plain attention (NoPE layers, MLA's narrower values, query/key norms, MoE, sliding windows)
    "ministral3": ("ministral3", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "phi": ("phi", dict(num_hidden_layers=2)),
    "cohere": ("cohere", dict(num_hidden_layers=2, use_qk_norm=True)),
    "olmo": ("olmo", dict(num_hidden_layers=2, clip_qkv=8.0)),
    "olmoe": ("olmoe", dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)),
    "granitemoe": ("granitemoe", dict(num_hidden_layers=2, attention_multiplier=0.3, **_MOE)),
    "granitemoeshared": ("granitemoeshared", dict(num_hidden_layers=2, shared_intermediate_size=64, **_MOE)),
    "smollm3": ("smollm3", dict(num_hidden_layers=4, pad_token_id=0, no_rope_layer_interval=2, use_sliding_window=True,
                                sliding_window=WINDOW)),
    "glm4": ("glm4", dict(num_hidden_layers=2, pad_token_id=0)),
    "glm4_moe": ("glm4_moe", dict(num_hidden_layers=2, use_qk_norm=True, **_DEEPSEEK_MOE)),
    "glm4_moe_lite": ("glm4_moe_lite", dict(num_hidden_layers=2, **_MLA, **_DEEPSEEK_MOE)),
    "deepseek_v3": ("deepseek_v3", dict(num_hidden_layers=2, head_dim=8, **_MLA, **_DEEPSEEK_MOE)),
    "ernie4_5_moe": ("ernie4_5_moe", dict(num_hidden_layers=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=32)),
    "seed_oss": ("seed_oss", dict(num_hidden_layers=2)),
    "exaone4": ("exaone4", dict(num_hidden_layers=4, sliding_window=WINDOW)),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", dict(num_hidden_layers=2)),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", dict(num_hidden_layers=2, num_experts=4, moe_topk=2)),
    "minimax_m2": ("minimax_m2", dict(num_hidden_layers=2, **_MOE)),
    "apertus": ("apertus", dict(num_hidden_layers=2)),
    "helium": ("helium", dict(num_hidden_layers=2)),
    "gpt_neox": ("gpt_neox", dict(num_hidden_layers=2, rotary_pct=0.5)),  # Pythia: partial rotary, parallel residual
    "deepseek_v2": ("deepseek_v2", dict(num_hidden_layers=2, **_MLA, **_DEEPSEEK_MOE)),
    "ernie4_5": ("ernie4_5", dict(num_hidden_layers=2)),
    # Classic families of TRL's tutorials (learned absolute positions, multi-query attention) and more attention-only
    # families found exact by forcing every causal-LM model type of transformers 5.25 into the layout
    "gpt2": ("gpt2", dict(num_hidden_layers=2, scale_attn_by_inverse_layer_idx=True)),
    "gpt_bigcode": ("gpt_bigcode", dict(num_hidden_layers=2, multi_query=True)),  # StarCoder 1, SantaCoder
    "opt": ("opt", dict(num_hidden_layers=2)),  # learned positions with an offset of 2
    "arcee": ("arcee", dict(num_hidden_layers=2)),
    "bitnet": ("bitnet", dict(num_hidden_layers=2)),
    "cohere2_moe": ("cohere2_moe", dict(num_hidden_layers=2, sliding_window=WINDOW, num_experts=4,
                                        layer_types=["sliding_attention", "full_attention"])),
    "exaone_moe": ("exaone_moe", dict(num_hidden_layers=2, sliding_window=WINDOW, moe_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2,
                                      layer_types=["sliding_attention", "full_attention"])),
    "granite_swa": ("granite_swa", dict(num_hidden_layers=2, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"])),
    "vaultgemma": ("vaultgemma", dict(num_hidden_layers=2, sliding_window=WINDOW,
                                      layer_types=["sliding_attention", "full_attention"])),  # softcapping too
    # Families with public checkpoints found exact the same way, each config turning on what the family adds:
    # EXAONE 3.x and InternLM3 (transformers builds Llama for them), nanochat (final logit softcapping), HyperCLOVA X
    # (muP-style multipliers, post-norms), MiniCPM5-MoE and Solar-Open (grouped routing), Hunyuan-V3, Jais2, AFMoE
    # (Arcee Trinity: muP, windows, NoPE full layers), Mellum and CWM (windows), MiMo-V2-Flash (windows, sinks on
    # sliding layers, narrower values; eager only)
    "exaone": ("exaone", dict(num_hidden_layers=2)),
    "internlm3": ("internlm3", dict(num_hidden_layers=2, attention_bias=True, mlp_bias=True)),
    "nanochat": ("nanochat", dict(num_hidden_layers=2, final_logit_softcapping=15.0)),
    "hyperclovax": ("hyperclovax", dict(num_hidden_layers=2, embedding_multiplier=2.0, logits_scaling=0.5,
                                        residual_multiplier=0.5, attention_multiplier=0.3, use_post_norm=True)),
    "minicpm5_moe": ("minicpm5_moe", dict(num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=32, n_group=2, topk_group=1,
                                          routed_scaling_factor=2.0)),
    "solar_open": ("solar_open", dict(num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=32, n_group=2, topk_group=1)),
    "jais2": ("jais2", dict(num_hidden_layers=2)),
    "hy_v3": ("hy_v3", dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            num_shared_experts=1)),
    "afmoe": ("afmoe", dict(num_hidden_layers=3, sliding_window=WINDOW, num_dense_layers=1, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1, mup_enabled=True,
                            route_scale=2.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "mellum": ("mellum", dict(num_hidden_layers=2, sliding_window=WINDOW, layer_types=["sliding_attention",
                                                                                       "full_attention"],
                              mlp_layer_types=["dense", "sparse"], num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32)),
    "cwm": ("cwm", dict(num_hidden_layers=2, sliding_window=WINDOW, layer_types=["sliding_attention",
                                                                                 "full_attention"])),
    "mimo_v2_flash": ("mimo_v2_flash", dict(num_hidden_layers=3, sliding_window=WINDOW, v_head_dim=8,
                                            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    # GLM-4-9B-chat-hf and GLM-Edge (`glm`: half of each head rotary, attention biases) and FlexOlmo (an OLMoE-style
    # mixture of experts with query/key norms)
    "glm": ("glm", dict(num_hidden_layers=2, pad_token_id=0)),
    "flex_olmo": ("flex_olmo", dict(num_hidden_layers=2, pad_token_id=0, num_experts=4, num_experts_per_tok=2)),
    # Gemma 3n (E2B / E4B's text: per-layer embeddings, AltUp, LAuReL, activation sparsity, the last layers reusing
    # earlier layers' keys and values) and Gemma 4: dense (E2B / E4B-style per-layer embeddings and shared keys and
    # values, 31B-style keys as values with one key/value head in its 512-wide global layers, double-wide MLPs, final
    # logit softcapping), mixture of experts (26B-A4B), and the multimodal classes `AutoModelForCausalLM` loads for
    # Gemma 4 and Gemma 4 unified checkpoints, on text (their global layers' heads 512 wide, as by default)
    "gemma3n": ("gemma3n_text", dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=_GEMMA_LAYERS,
                                     pad_token_id=0, vocab_size_per_layer_input=32768, hidden_size_per_layer_input=8,
                                     num_kv_shared_layers=2, altup_num_inputs=2, laurel_rank=8,
                                     activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0])),
    "gemma4": ("gemma4_text", dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=_GEMMA_LAYERS,
                                   pad_token_id=0, vocab_size_per_layer_input=32768, hidden_size_per_layer_input=8,
                                   num_kv_shared_layers=2, attention_k_eq_v=True, num_global_key_value_heads=1,
                                   global_head_dim=512, use_double_wide_mlp=True, final_logit_softcapping=30.0)),
    "gemma4_moe": ("gemma4_text", dict(num_hidden_layers=2, sliding_window=WINDOW, layer_types=_GEMMA_LAYERS[:2],
                                       pad_token_id=0, hidden_size_per_layer_input=0, global_head_dim=512,
                                       enable_moe_block=True, num_experts=4, top_k_experts=2,
                                       moe_intermediate_size=32)),
    "gemma4_multimodal": ("gemma4", dict(
        text_config=dict(num_hidden_layers=2, sliding_window=WINDOW, layer_types=_GEMMA_LAYERS[:2], pad_token_id=0,
                         hidden_size_per_layer_input=0, use_bidirectional_attention="vision"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=8),
        audio_config=None)),
    "gemma4_unified_multimodal": ("gemma4_unified", dict(
        text_config=dict(num_hidden_layers=4, sliding_window=WINDOW, layer_types=_GEMMA_LAYERS, pad_token_id=0,
                         num_kv_shared_layers=2),
        vision_config=dict(patch_size=8, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16,
                           output_proj_dims=64),
        audio_config=None)),
    # dots.llm1 (windows on its later layers, shared experts), Youtu-LLM (multi-head latent attention, interleaved
    # rotary), Apertus 1.5's text model, and Sarvam-MoE and Param-2-MoE (model types transformers builds GLM-4-MoE for)
    "dots1": ("dots1", dict(num_hidden_layers=2, pad_token_id=0, sliding_window=WINDOW, max_window_layers=1,
                            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            first_k_dense_replace=1, n_shared_experts=1)),
    "youtu": ("youtu", dict(num_hidden_layers=2, pad_token_id=0, head_dim=8, **_MLA)),
    "apertus1p5": ("apertus1p5_text", dict(num_hidden_layers=2, pad_token_id=0)),
    "sarvam_moe": ("sarvam_moe", dict(num_hidden_layers=2, pad_token_id=0, **_DEEPSEEK_MOE)),
    "param2moe": ("param2moe", dict(num_hidden_layers=2, pad_token_id=0, **_DEEPSEEK_MOE)),
    # Mistral 3 (Mistral Small 3.x, Magistral, Ministral 3): a multimodal model that `AutoModelForCausalLM` does not
    # load; TRL loads it by its config's architecture, `Mistral3ForConditionalGeneration`. On text, with a Mistral or a
    # Ministral 3 language model
    "mistral3_multimodal": ("mistral3", dict(
        text_config=dict(model_type="mistral", num_hidden_layers=2, sliding_window=WINDOW),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           head_dim=16, patch_size=8, image_size=32),
        spatial_merge_size=2)),
    "ministral3_multimodal": ("mistral3", dict(
        text_config=dict(model_type="ministral3", num_hidden_layers=2, sliding_window=WINDOW),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           head_dim=16, patch_size=8, image_size=32),
        spatial_merge_size=2)),
    # Vision-language models on text, as TRL loads them (`...ForConditionalGeneration`): Qwen2.5-VL and Qwen3-VL
    # (multimodal rotary sections; positions matter, 1e-2 relative when they are wrong) and LLaVA (a Llama inside)
    "qwen2_5_vl_multimodal": ("qwen2_5_vl", dict(
        text_config=dict(num_hidden_layers=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=8, fullatt_block_indexes=[0]))),
    "qwen3_vl_multimodal": ("qwen3_vl", dict(
        text_config=dict(num_hidden_layers=2, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                            "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=8, deepstack_visual_indexes=[0]))),
    "llava_multimodal": ("llava", dict(
        text_config=dict(model_type="llama", num_hidden_layers=2),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32))),
    # Granite 4's dense checkpoints (granite-4.0-1b, -350m, -micro): the hybrid family with attention layers only and
    # no experts; its multipliers on
    "granite4_dense": ("granitemoehybrid", dict(num_hidden_layers=2, layer_types=["attention", "attention"],
                                                num_local_experts=0, num_experts_per_tok=0, shared_intermediate_size=64,
                                                position_embedding_type="rope", attention_multiplier=0.3,
                                                residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=0.5)),
    # A multimodal model on text-only batches (what AutoModelForCausalLM loads for a Gemma 3 4B-27B checkpoint)
    "gemma3_multimodal": ("gemma3", dict(
        text_config=dict(num_hidden_layers=2, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4)),
    "lfm2": ("lfm2", dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], conv_L_cache=3,
                          block_auto_adjust_ff_dim=False)),
    "nemotron_h": ("nemotron_h", dict(layers_block_type=["mamba", "attention", "mlp"], mamba_num_heads=8,
                                      mamba_head_dim=16, ssm_state_size=8, n_groups=1, conv_kernel=4, chunk_size=16,
                                      )),
    "jamba": ("jamba", dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                            expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_dt_rank=8,
                            **{k: v for k, v in _MAMBA.items() if k in ("mamba_d_state", "mamba_d_conv",
                                                                        "mamba_expand")})),
    "falcon_h1": ("falcon_h1", dict(num_hidden_layers=2, mamba_d_ssm=128, **_MAMBA)),
    "granitemoehybrid": ("granitemoehybrid", dict(num_hidden_layers=2, layer_types=["mamba", "attention"],
                                                  shared_intermediate_size=64, **_MOE, **_MAMBA)),
    "bamba": ("bamba", dict(num_hidden_layers=2, attn_layer_indices=[1], **_MAMBA)),
    "qwen3_next": ("qwen3_next", dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                                      linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                      linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
}


def build_family(name: str, seed: int = 0, attn_implementation: str | None = None):
    """A tiny random `AutoModelForCausalLM` of family `name` (float32, eval mode; a multimodal model that class does not
    load, as TRL's `create_model_from_path` loads it: `AutoModelForImageTextToText`), or raise if this transformers
    cannot build it (an unknown model type, a config that refuses the tiny sizes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type, overrides = FAMILIES[name]
    if "text_config" in overrides:  # multimodal: the width is the language model's
        config = AutoConfig.for_model(model_type, **{**overrides, "text_config": {**WIDTH, **overrides["text_config"]}})
    else:
        config = AutoConfig.for_model(model_type, **{**WIDTH, **overrides})
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    auto = AutoModelForCausalLM if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModelForImageTextToText
    return auto.from_config(config, dtype=torch.float32, **kwargs).eval()
