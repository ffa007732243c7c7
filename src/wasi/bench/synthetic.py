"""What a benchmark feeds its model: input shapes, synthetic batches, pretrained-like spectra.

A randomly initialised linear layer has a flat singular-value spectrum, so an energy
threshold ``eps`` keeps about ``eps`` of its rank and the WASI methods say nothing about
what they do to a pretrained model. :func:`decay_spectrum` therefore replaces every such
weight, before any method is applied, by a matrix of the same shape and Frobenius norm
whose singular values decay as a power law, the way fine-tuned transformers' do::

    W  <-  Q_out @ diag(s) @ Q_in^T,      s_j = c * j^(-alpha),  j = 1 .. min(O, I)

``Q_out (O, m)`` and ``Q_in (I, m)`` are orthonormal (QR of a Gaussian drawn from a
generator seeded with ``seed`` and the layer's index, so every benchmark worker builds the
same model), and ``c`` restores the original ``||W||_F``. The top-``k`` energy fraction is
then ``sum_{j<=k} j^(-2 alpha) / sum_j j^(-2 alpha)``: with ``alpha = 0.5`` a 768-wide layer
keeps 10, 43, 181 and 373 directions at ``eps`` 0.4, 0.6, 0.8 and 0.9
(:func:`spectrum_rank`).
"""

from __future__ import annotations

import torch
from torch import nn

from wasi.bench.settings import SYNTHETIC
from wasi.functional import energy_rank
from wasi.training.models import ModelBundle, model_inputs

SYNTHETIC_CLASSES = 10
__all__ = ["SYNTHETIC", "SYNTHETIC_CLASSES", "decay_spectrum", "input_spec", "spectrum_rank", "synthetic_batches"]


def input_spec(model: str, arch: str | None = None, *, task: str | None = None,
               cache_dir: str | None = None) -> ModelBundle:
    """What ``wasi.training.models.build_model(model, arch=arch)`` will take as input, without its weights.

    See :func:`wasi.training.models.model_inputs`; the result's ``model`` is None.

    Raises:
        ModelError: the model cannot be resolved.
    """
    return model_inputs(model, arch=arch, task=task, cache_dir=cache_dir)


def synthetic_batches(
    spec: ModelBundle, *, batch_size: int, count: int, seed: int, max_length: int = 128,
    num_classes: int = SYNTHETIC_CLASSES,
) -> list[dict[str, torch.Tensor]]:
    """``count`` random batches at the model's input shape, with random labels.

    Images are smooth random fields (Gaussian noise at 1/8 of the resolution, upsampled
    bilinearly, plus a little pixel noise) rather than white noise, so that activations have
    the decaying spectrum real images give them; texts are uniform random token ids of
    length ``max_length`` with a full attention mask.

    Returns:
        Batches as ``ModelBundle.logits`` takes them: ``images (B, C, S, S)`` or
        ``input_ids, attention_mask (B, max_length)``, and ``labels (B,)``.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        labels = torch.randint(num_classes, (batch_size,), generator=g)  # (B,)
        if spec.kind == "image":
            size, coarse = spec.image_size, max(2, spec.image_size // 8)
            low = torch.randn(batch_size, spec.channels, coarse, coarse, generator=g)  # (B, C, s, s)
            images = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
            images = images + 0.1 * torch.randn(images.shape, generator=g)  # (B, C, S, S)
            batches.append({"images": images, "labels": labels})
        else:
            vocab = int(spec.tokenizer.vocab_size)
            low = min(1000, vocab // 2)  # above BERT-style special and unused ids
            ids = torch.randint(low, vocab, (batch_size, max_length), generator=g)  # (B, T)
            mask = torch.ones_like(ids)  # (B, T)
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def spectrum_rank(width: int, alpha: float, eps: float) -> int:
    """The rank ``eps`` keeps of a ``width``-wide spectrum ``s_j ~ j^(-alpha)`` (section 3)."""
    s = torch.arange(1, width + 1, dtype=torch.float64) ** (-alpha)  # (m,)
    return energy_rank(s**2, eps)


@torch.no_grad()
def decay_spectrum(
    model: nn.Module, *, alpha: float, seed: int, skip: tuple[str, ...] = ("head",)
) -> list[str]:
    """Give every ``nn.Linear`` weight of ``model`` a power-law spectrum, in place.

    See the module docstring for the construction. One layer at a time, so the extra memory
    is a few copies of the largest layer.

    Args:
        model: any module; its ``nn.Linear`` weights ``(O, I)`` are rewritten.
        alpha: decay exponent, ``s_j ~ j^(-alpha)``; larger is steeper.
        seed: seed of the per-layer generators.
        skip: module paths left alone (the classifier head).

    Returns:
        The paths of the rewritten layers.
    """
    done = []
    for index, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in skip:
            continue
        weight = module.weight  # (O, I)
        o, i = weight.shape
        m = min(o, i)
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        q_out, _ = torch.linalg.qr(torch.randn(o, m, generator=g, dtype=torch.float32))  # (O, m)
        q_in, _ = torch.linalg.qr(torch.randn(i, m, generator=g, dtype=torch.float32))  # (I, m)
        s = torch.arange(1, m + 1, dtype=torch.float32) ** (-alpha)  # (m,)
        s *= weight.float().norm() / s.norm()  # keep ||W||_F
        weight.copy_(((q_out * s) @ q_in.T).to(weight.dtype))  # (O, m) @ (m, I)
        done.append(name)
    return done
