"""Qwen2 causal language model (Qwen team 2024, "Qwen2 Technical Report",
https://arxiv.org/abs/2407.10671; also Qwen2.5), numerically equivalent to ``transformers``'
``Qwen2ForCausalLM`` (``transformers/models/qwen2/modeling_qwen2.py``).

The architecture is Llama's (:mod:`jaxfit.models.llama`: RMSNorm, RoPE, GQA, SwiGLU, tied
or untied head) with biases on the q/k/v projections and none on ``o_proj`` or the MLP
(``LlamaConfig.qkv_bias``), so this module is a config variant: :class:`Qwen2Config`
holds Qwen2's defaults and checks, :class:`Qwen2ForCausalLM` runs Llama's computation.
The parameter tree is Llama's plus ``layers/self_attn/{q,k,v}_proj/bias``.

Sliding-window attention (HF ``use_sliding_window``, off by default in ``transformers``)
is not implemented: every layer attends to the whole causal context, and
``Qwen2Config(use_sliding_window=True)`` raises.
"""

from __future__ import annotations

import dataclasses

from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    """Qwen2 architecture: :class:`~jaxfit.models.llama.LlamaConfig`'s fields with the
    defaults of HF ``Qwen2Config`` (Qwen2-7B sizes), ``qkv_bias=True``, and
    ``use_sliding_window`` (must stay ``False``).

    Raises:
      ValueError: ``use_sliding_window=True``, or biases other than on q/k/v
        (``qkv_bias=False``, ``attention_bias`` or ``mlp_bias``), which Qwen2 never has.
    """

    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    qkv_bias: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    use_sliding_window: bool = False

    def __post_init__(self):
        if self.use_sliding_window:
            raise ValueError(
                "use_sliding_window=True: jaxfit's Qwen2 has no sliding-window attention "
                "(every layer attends to the full causal context); only checkpoints with "
                "use_sliding_window=false are supported"
            )
        if not self.qkv_bias or self.attention_bias or self.mlp_bias:
            raise ValueError(
                "Qwen2 has biases on q/k/v only: qkv_bias=True, attention_bias=False, "
                f"mlp_bias=False (got {self.qkv_bias}, {self.attention_bias}, {self.mlp_bias})"
            )
        super().__post_init__()


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 with its LM head: Llama's computation over a :class:`Qwen2Config` (calls and
    parameters as :mod:`jaxfit.models.llama`)."""

    config: Qwen2Config
