"""Llama (1/2/3/3.1+, SmolLM, ...): pre-norm decoder with GQA, RoPE (incl. llama3 scaling), SwiGLU.

The family base for Mistral, Qwen2 and Qwen3, which differ only in :class:`AttentionOptions`
(biases, per-head q/k norm, sliding window) and are thin subclasses.

Tokens of all requests are packed along one axis: ``input_ids``/``positions`` are ``[T]`` and
hidden states ``[T, hidden]``. Attention goes through :class:`~sglang.engine.layers.Attention`
to the batch's backend, which owns the paged KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sglang.engine.layers.activation import SiluAndMul
from sglang.engine.layers.attention import Attention
from sglang.engine.layers.embedding import LMHead, VocabEmbedding
from sglang.engine.layers.fused import try_skinny_linear
from sglang.engine.layers.linear import Linear, MergedColumnLinear, QKVLinear
from sglang.engine.layers.norm import RMSNorm
from sglang.engine.layers.rotary import RotaryEmbedding
from sglang.engine.models.weight_loading import LLAMA_STACKED, load_hf_weights

if TYPE_CHECKING:
    from sglang.engine.runner.forward_batch import ForwardBatch


@dataclass(frozen=True)
class AttentionOptions:
    """Per-layer attention variations across the Llama family."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    sliding_window: int | None = None


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported (only 'silu')")
        bias = bool(getattr(config, "mlp_bias", False))
        inter = int(config.intermediate_size)
        self.gate_up_proj = MergedColumnLinear(config.hidden_size, {"gate": inter, "up": inter}, bias=bias, dtype=dtype)
        self.act_fn = SiluAndMul()
        self.down_proj = Linear(inter, config.hidden_size, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode batches on CUDA: gate/up product and SiLU-mul in one skinny-matmul kernel
        h = try_skinny_linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias, gated=True)
        return self.down_proj(self.act_fn(self.gate_up_proj(x)) if h is None else h)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, opts: AttentionOptions, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = _head_dim(config)
        hidden = int(config.hidden_size)
        self.qkv_proj = QKVLinear(hidden, self.head_dim, self.num_heads, self.num_kv_heads, bias=opts.qkv_bias, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=opts.o_bias, dtype=dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if opts.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, dtype=dtype)
        self.attn = Attention(
            layer_id, self.num_heads, self.num_kv_heads, self.head_dim, sliding_window=opts.sliding_window
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.q_norm is not None and self.k_norm is not None:
            t = hidden.shape[0]
            q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim)).reshape(t, -1)
            k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)).reshape(t, -1)
        return self.o_proj(self.attn(q, k, v, batch, rotary.rope_for(positions, q, k)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, opts: AttentionOptions, dtype: torch.dtype) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, layer_id, opts, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp_out, residual)``; the next layer's norm adds them (fused add + norm)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch, rotary)
        hidden, residual = self.post_attention_layernorm.add_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, options: list[AttentionOptions]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, options[i], dtype) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.rotary_emb = RotaryEmbedding.from_hf(config, head_dim=_head_dim(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, batch, self.rotary_emb)
        if residual is None:  # no layers
            return self.norm(hidden)
        hidden, _ = self.norm.add_norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Model contract (the runner relies on exactly this):

    - ``__init__(config, dtype)``: parameters are allocated uninitialised on the default device
      (build under ``with torch.device(...)``); fill them with :meth:`load_weights` or dummy init.
    - ``forward(input_ids [T], positions [T], batch) -> [T, hidden]`` final-normed hidden states;
      positions are absolute; KV of the T tokens is written by the attention backend.
    - ``compute_logits(hidden [N, hidden]) -> [N, vocab]`` in the model dtype.
    - ``load_weights(iterable of (HF name, tensor))``: unknown names raise; parameters left
      unloaded raise (a tied ``lm_head`` needs no tensor); rotary ``inv_freq`` is ignored.
    """

    def __init__(self, config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        options = [self.attention_options(config, i) for i in range(config.num_hidden_layers)]
        self.model = LlamaModel(config, dtype, options)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            tied_to=self.model.embed_tokens if self.tie_word_embeddings else None,
        )

    @classmethod
    def attention_options(cls, config: Any, layer_id: int) -> AttentionOptions:
        """Attention variant of layer ``layer_id``; subclasses override this for their family."""
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = ("lm_head.weight",) if self.tie_word_embeddings else ()
        load_hf_weights(self, weights, LLAMA_STACKED, tied_names=tied)
