"""Training compute, so forests and dense baselines can be matched.

FLOPs per trained token = 6·N + 12·L·T·d_attn (Kaplan et al. 2020; PaLM appendix B), where
- N is the number of parameters that take part in matrix multiplies: every parameter except the
  input embedding table (a lookup costs no multiply-adds), with the output projection counted even
  when it is tied to the input embedding;
- L is the number of layers, T the training context length, d_attn = heads × head_dim;
- 12·L·T·d_attn is the attention score and value products (2·2·T·d_attn forward per token per
  layer, times 3 for forward + backward), counted over the full context as PaLM does (causal
  masking is not subtracted).
Training FLOPs of a run = FLOPs per token × tokens trained (batch × accumulation × seq_len × steps).
"""

from __future__ import annotations

from transformers import PreTrainedModel


def matmul_params(model: PreTrainedModel) -> int:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    n = total - emb.numel()
    if out is not None and out.weight is emb:  # tied: the LM head multiply still happens
        n += emb.numel()
    return n


def flops_per_token(model: PreTrainedModel, seq_len: int) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d_attn = c.num_attention_heads * head_dim
    return 6 * matmul_params(model) + 12 * c.num_hidden_layers * seq_len * d_attn


FLOPS_FORMULA = "6*N*tokens + 12*layers*seq_len*d_attn*tokens; N excludes the input embedding table"
