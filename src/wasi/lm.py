"""Causal-LM memory: the next-token loss without the whole ``(tokens, vocab)`` logits at once.

Over a 49k vocabulary, batch 4 x 128 tokens, float32 logits take 96 MiB, and ``F.cross_entropy``
keeps about as much again for its backward. :func:`chunked_cross_entropy` computes the same loss
and gradients from the final hidden states and the head's weight, a slice of tokens at a time,
recomputing each slice's logits in backward; :func:`causal_lm_loss` does it for a ``transformers``
causal LM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100  # label of a position the loss skips (the transformers convention)

CHUNK_BYTES = 32 * 2**20
"""Bytes of float32 logits one slice may hold when ``chunk`` is not given."""


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden (T, D) @ weight (V, D)^T (+ bias)`` against ``labels (T,)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, ignore_index):
        with torch.autocast(hidden.device.type, enabled=False):
            valid = labels != ignore_index  # (T,)
            count = valid.sum()
            lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)  # (T,) log-sum-exp per token
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[0], chunk):
                stop = min(start + chunk, hidden.shape[0])
                logits = _logits(hidden[start:stop], weight, bias)  # (t, V) float32
                lse[start:stop] = torch.logsumexp(logits, dim=-1)
                target = logits.gather(1, labels[start:stop].clamp_min(0).unsqueeze(1)).squeeze(1)  # (t,)
                total += ((lse[start:stop] - target) * valid[start:stop]).sum()
                del logits
        ctx.chunk = chunk
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, labels, lse, valid, count)
        return total / count  # NaN when every label is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse, valid, count = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        scale = (grad.float() / count).to(torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                stop = min(start + ctx.chunk, hidden.shape[0])
                logits = _logits(hidden[start:stop], weight, bias)  # (t, V), recomputed
                # d loss / d logits = (softmax - onehot) * valid / count
                probs = torch.exp(logits.sub_(lse[start:stop].unsqueeze(1)))  # (t, V), in place
                del logits
                rows = torch.arange(stop - start, device=probs.device)
                probs[rows, labels[start:stop].clamp_min(0)] -= 1.0
                probs.mul_((valid[start:stop].to(probs.dtype) * scale).unsqueeze(1))
                if need_h:
                    grad_h[start:stop] = (probs @ weight.float()).to(hidden.dtype)  # (t, D)
                if need_w:
                    grad_w.addmm_(probs.T, hidden[start:stop].float())  # (V, t) @ (t, D)
                if need_b:
                    grad_b += probs.sum(0)
                del probs
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden.float() @ weight.float().T  # (t, D) @ (D, V) -> (t, V), float32 whatever the inputs
    return logits + bias.float() if bias is not None else logits


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          chunk: int | None = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` (mean) without all the logits at once.

    The logits exist ``chunk`` tokens at a time, in float32, in forward and again in backward
    (recomputed: one more ``(T, D) x (D, V)`` matmul); only the per-token log-sum-exp ``(T,)`` is
    kept between the passes. The gradient of ``weight`` is formed only when it requires grad (a
    frozen, tied embedding needs none).

    Args:
        hidden: ``(..., D)`` final hidden states (any float dtype; the logits are float32).
        weight: ``(V, D)`` the output head's weight; bias: ``(V,)`` or None.
        labels: ``(...)`` int64 targets in ``[0, V)``, or ``ignore_index``; already aligned with
            ``hidden`` (for a causal LM, shifted by one: :func:`causal_lm_loss` does it).
        chunk: tokens per slice; default so that a slice's logits take :data:`CHUNK_BYTES`.
        ignore_index: label of the positions left out of the mean.

    Returns:
        The 0-dim float32 mean loss over the positions not ignored (NaN if there are none).

    Raises:
        ValueError: mismatched shapes, a non-positive ``chunk``, or a label outside ``[0, V)``.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)}: labels must have the "
                         "hidden states' shape without the last dim")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[-1]}) for hidden "
                         f"{tuple(hidden.shape)}")
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({vocab},)")
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (4 * vocab))
    if not (isinstance(chunk, int) and chunk > 0):
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
    flat = labels.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        raise ValueError(f"label {int(flat[bad][0])} is outside [0, {vocab}) and is not ignore_index "
                         f"{ignore_index}")
    return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat, chunk, ignore_index)


def causal_lm_loss(model: nn.Module, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                   labels: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """The next-token loss of a ``transformers`` causal LM through :func:`chunked_cross_entropy`.

    Equals ``model(input_ids, attention_mask=..., labels=labels).loss`` (token ``t`` predicted
    from the tokens before it, ``IGNORE_INDEX`` skipped) for a head that is a plain linear map
    (Llama, SmolLM2, GPT-2; not a model that rescales or caps its logits). The body runs as
    ``model.base_model``; the head is ``model.get_output_embeddings()``.

    Args:
        model: a ``transformers`` ``...ForCausalLM``.
        input_ids: ``(B, N)``; attention_mask: ``(B, N)`` or None.
        labels: ``(B, N)``, default ``input_ids`` with padded positions (mask 0) ignored.
        chunk: tokens per slice of logits (see :func:`chunked_cross_entropy`).

    Raises:
        TypeError: the model has no ``nn.Linear`` output head or no ``base_model``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or body is None or body is model:
        raise TypeError(f"{type(model).__name__}: causal_lm_loss needs a transformers causal LM whose "
                        "get_output_embeddings() is an nn.Linear and whose base_model is its body")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, N, D)
    return chunked_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias, chunk=chunk)


__all__ = ["CHUNK_BYTES", "IGNORE_INDEX", "causal_lm_loss", "chunked_cross_entropy"]
