"""An encoder layer computed over the real tokens only.

Every step of a BERT layer but the attention works token by token: the query, key, value and
output projections, the feed-forward and the layer norms (on a CPU, 85% of the forward pass).
A padded batch pays them for its padding too: many small unary calls (rerank's groups) are
padded 1.2x. So each such layer gathers its batch's real tokens, runs those steps on them
alone, and puts them back in the padded shape only for the attention and for its output (which
the model's own hooks record as its hidden state, and the next layer takes). Which tokens are
real the engine says (`real_tokens`, from the lengths it padded), not a reading of the mask: no
device sync per layer, and a call made without it (another mask, another caller) runs as it
was. The result is what the padded pass gives up to the math library's rounding, which depends
on how many rows one matrix product holds (float32: hidden states within a few 1e-6, pooled
vectors within 2e-7, as the same text alone or in another batch differs; tests compare every
architecture's vectors with sentence-transformers').

Only layers of BERT's own structure are changed (BERT and its copies in transformers: RoBERTa,
XLM-RoBERTa, ELECTRA, CamemBERT); others (DistilBERT, MPNet) run as they are.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

# Gathering and putting back cost a few percent of a layer: below that share of padding, the
# layer runs padded (sorted stream batches are padded 1-3%).
LITTLE_PADDING = 0.97
BERT_LAYERS = {"BertLayer", "RobertaLayer", "XLMRobertaLayer", "ElectraLayer", "CamembertLayer"}

# The forward pass in progress on this thread: (rows, longest, flat positions of its real tokens).
_batch: contextvars.ContextVar = contextvars.ContextVar("bertstream_real_tokens", default=None)


def install(model: torch.nn.Module) -> int:
    """Make the model's BERT-structured layers compute over real tokens only; how many were."""
    layers = [module for module in model.modules()
              if type(module).__name__ in BERT_LAYERS and not getattr(module, "is_decoder", True)
              and not hasattr(module, "crossattention")]
    for layer in layers:
        layer.forward = _unpadded_forward(layer, layer.forward)
        layer.computes_real_tokens_only = True
    return len(layers)


def installed(model: torch.nn.Module) -> bool:
    """Whether install() changed the model's layers."""
    return any(getattr(module, "computes_real_tokens_only", False) for module in model.modules())


def computes_real_only(real: int, rows: int, longest: int) -> bool:
    """Whether a batch of `real` tokens in rows x longest is padded enough to gather."""
    return real <= LITTLE_PADDING * rows * longest


@contextmanager
def real_tokens(real: np.ndarray, device: torch.device):
    """Within: the installed layers compute only the tokens where `real` (rows x longest,
    boolean: the padded batch's real positions) is true, if it is padded enough to be worth it."""
    rows, longest = real.shape
    where = np.flatnonzero(real)
    token = _batch.set((rows, longest, torch.from_numpy(where).to(device, non_blocking=True))
                       if computes_real_only(len(where), rows, longest) else None)
    try:
        yield
    finally:
        _batch.reset(token)


def _unpadded_forward(layer, padded_forward):
    attention, projections = layer.attention.self, layer.attention.output
    width = attention.attention_head_size

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        batch = _batch.get()
        if batch is None or attention_mask is None or layer.training \
                or hidden_states.shape[:2] != batch[:2]:  # not the engine's batch
            return padded_forward(hidden_states, attention_mask, *args, **kwargs)
        rows, longest, real = batch
        hidden = hidden_states.shape[2]
        tokens = hidden_states.reshape(rows * longest, hidden).index_select(0, real)

        def padded(values: torch.Tensor) -> torch.Tensor:
            full = values.new_zeros(rows * longest, values.shape[1]).index_copy_(0, real, values)
            return full.view(rows, longest, -1, width).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            padded(attention.query(tokens)), padded(attention.key(tokens)),
            padded(attention.value(tokens)), attn_mask=attention_mask, scale=attention.scaling)
        context = context.transpose(1, 2).reshape(rows * longest, hidden).index_select(0, real)
        attended = projections.LayerNorm(projections.dense(context) + tokens)
        out = layer.output.LayerNorm(layer.output.dense(layer.intermediate(attended)) + attended)
        return out.new_zeros(rows * longest, hidden).index_copy_(0, real, out).view(
            rows, longest, hidden)

    return forward
