"""The shared-prompt layout: each prompt encoded once, its K completions after it, in one flat row of real tokens.

- `packing`: the row (`build_shared_prompt_batch`), the attention function the models' attention is routed through
  (`shared_prompt_attention`), the checks of every forward (`shared_prompt_forward`), and the trainers' choice of
  layout (`SharedPromptLayoutMixin`);
- `varlen`: that attention as one variable-length call per layer, its kernels (flash-attn, torch's `varlen_attn`, the
  PyTorch paths) and the order they are tried in;
- `torch_paths`: the PyTorch paths (per-segment SDPA, padded SDPA), which run anywhere and implement every variant;
- `families`: which models the layout is exact for (the allow-lists, `shared_prompt_support`).
"""
