"""The causal-LM task of ``wasi train``: token windows, next-token loss, held-out perplexity, a sample."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wasi.data.core import DataError
from wasi.lm import IGNORE_INDEX, causal_lm_loss
from wasi.training.batches import Split, make_batch

EVAL_WINDOWS = 8  # windows per evaluation forward: bounds the (B, T, vocab) logits
SAMPLE_PROMPT_TOKENS = 24
SAMPLE_NEW_TOKENS = 32


def token_windows(texts: list[str], tokenizer, window: int) -> list[list[int]]:
    """Tokenize documents, join them (an end-of-text token after each) and cut the stream into windows.

    Args:
        texts: the documents of one split.
        tokenizer: a ``transformers`` tokenizer.
        window: tokens per window; the stream's last partial window is dropped.

    Returns:
        Windows of exactly ``window`` token ids.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return [stream[i:i + window] for i in range(0, len(stream) - window + 1, window)]


def make_lm_split(texts: list[str], tokenizer, window: int, name: str) -> Split:
    """A split of token windows (``labels`` are unused zeros; the targets are the ids themselves).

    Raises:
        DataError: the documents hold fewer than ``window`` tokens.
    """
    windows = token_windows(texts, tokenizer, window)
    if not windows:
        raise DataError(f"the {name} documents hold fewer than {window} tokens: add text or lower --max-length")
    return Split(len(windows), torch.zeros(len(windows), dtype=torch.int64), tokens=windows)


def lm_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets: the input ids, with padded positions ignored."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)


# config fields of transformers models whose head does more than a linear map (scaled or capped
# logits): their loss goes through the model's own forward
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _chunkable(model: nn.Module) -> nn.Module | None:
    # the transformers causal LM whose loss wasi.causal_lm_loss computes exactly, or None: a LoRA
    # wrapper's base model (adapters inside), not a data-parallel wrapper (its forward must run)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    if not isinstance(head, nn.Linear) or getattr(inner, "base_model", inner) is inner or config is None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return inner


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch (``labels = input_ids``, shifted by one).

    For a ``transformers`` causal LM with a plain linear head (Llama, SmolLM2, GPT-2; LoRA-wrapped
    too), through :func:`wasi.causal_lm_loss`: the ``(tokens, vocab)`` logits exist a slice at a
    time, never whole (SmolLM2, batch 4 x 256 tokens: 192 MiB of float32 logits, and as much again
    for the loss's backward). Under a data-parallel wrapper, or for a head that scales or caps its
    logits, the model's own loss.
    """
    inner = _chunkable(model)
    if inner is not None:
        return causal_lm_loss(inner, batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=lm_labels(batch))
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=lm_labels(batch)).loss


@torch.no_grad()
def lm_evaluate(model: nn.Module, split: Split, pad_id: int, device: torch.device,
                batch_size: int = EVAL_WINDOWS) -> tuple[float, float]:
    """Mean next-token loss over every predicted token of ``split``, and its perplexity ``exp(loss)``.

    Windows go through ``min(batch_size, EVAL_WINDOWS)`` at a time (the training batch, so that
    evaluation never holds more logits than a step). The model is put in eval mode for the pass
    and its previous mode restored.
    """
    training = model.training
    model.eval()
    total, count = 0.0, 0
    step = max(1, min(batch_size, EVAL_WINDOWS))
    for start in range(0, split.size, step):
        idx = torch.arange(start, min(start + step, split.size))
        batch = make_batch(split, idx, pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        targets = lm_labels(batch)[:, 1:]  # (B, T-1): token t is predicted from tokens < t
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    model.train(training)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 700.0))


def _generator(model: nn.Module) -> nn.Module:
    # a LoRA-wrapped model generates through its base model (the adapters stay active)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def generation_sample(model: nn.Module, tokenizer, split: Split, device: torch.device) -> tuple[str, str]:
    """A greedy continuation of the start of the first window of ``split``: ``(prompt, continuation)``."""
    training = model.training
    model.eval()
    prompt = torch.tensor([split.tokens[0][:SAMPLE_PROMPT_TOKENS]], device=device)
    try:
        out = _generator(model).generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SAMPLE_NEW_TOKENS,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        model.train(training)
    return tokenizer.decode(prompt[0]), tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
