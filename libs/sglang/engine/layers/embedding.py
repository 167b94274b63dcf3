"""Token embedding and LM head (optionally tied to the embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang.engine.layers.fused import try_skinny_linear


class VocabEmbedding(nn.Module):
    """``weight`` ``[vocab_size, hidden_size]``; forward maps token ids ``[T]`` to ``[T, hidden]``."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(nn.Module):
    """Projects hidden states ``[N, hidden]`` to vocabulary logits ``[N, vocab]``, always float32.

    A tied head (``tied_to`` given) shares the embedding's Parameter object: ``named_parameters()``
    lists it once, under the embedding's name, so checkpoints need no ``lm_head.weight``.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype | None = None,
        tied_to: VocabEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tied = tied_to is not None
        if tied_to is not None:
            if (tied_to.vocab_size, tied_to.hidden_size) != (vocab_size, hidden_size):
                raise ValueError(
                    f"cannot tie lm_head [{vocab_size}, {hidden_size}] to embedding "
                    f"[{tied_to.vocab_size}, {tied_to.hidden_size}]"
                )
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # In the model dtype: consumers that need float32 convert (the sampler's one-pass draw and
        # argmax read bf16 as is; a float32 copy cost ~0.1 ms per batch-256 decode step on an H100).
        y = try_skinny_linear(hidden, self.weight)  # decode batches on CUDA
        return y if y is not None else F.linear(hidden, self.weight)

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied={self.tied}"
