"""The built-in demo behind `wasi demo`: pretrain a tiny ViT on digits, convert it to WASI, fine-tune it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from wasi.config import WASIConfig
from wasi.convert import convert
from wasi.memory import count_saved_tensors, summary
from wasi.models import build_vit
from wasi.training.measure import process_peak_mb


class DemoError(ValueError):
    """A demo that cannot run as asked (reported in one line by the CLI)."""


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as ``(N, 1, 8, 8)`` images in [0, 1], split 80/20 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=0.2, random_state=seed, stratify=data.target
    )
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, generator: torch.Generator,
           batch_size: int = 64) -> list[float]:
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def _curve(losses: list[float], every: int) -> str:
    rows = []
    top = max(losses)
    for start in range(0, len(losses), every):
        chunk = losses[start:start + every]
        mean = sum(chunk) / len(chunk)
        bar = "#" * max(1, round(40 * mean / top))
        rows.append(f"  steps {start + 1:>4}-{start + len(chunk):<4} loss {mean:6.3f} {bar}")
    return "\n".join(rows)


def plot_losses(dense: list[float], wasi: list[float], path: str | os.PathLike) -> Path:
    """Draw the dense pretraining and WASI fine-tuning losses, one point per step, to a new PNG.

    Raises:
        DemoError: ``path`` exists already (it is kept) or cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.exists():
        raise DemoError(f"--plot {str(path)!r} already exists; it is kept: give a new file name")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(range(1, len(dense) + 1), dense, ".", markersize=3, label="dense pretraining")
    ax.plot(range(len(dense) + 1, len(dense) + len(wasi) + 1), wasi, ".", markersize=3, label="WASI fine-tuning")
    ax.set(xlabel="step", ylabel="training loss", title="wasi demo: vit-micro on scikit-learn digits")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DemoError(f"--plot: could not write {str(path)!r}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return path


def run_demo(*, pretrain_steps: int = 150, steps: int = 300, eps: float = 0.8, seed: int = 0,
             plot: str | os.PathLike | None = None, print_fn=print) -> dict:
    """Pretrain a tiny ViT densely, convert its MLP linears to WASI and fine-tune it.

    Args:
        plot: also draw both loss curves to this new PNG file.

    Returns:
        A dict with the accuracies, both phases' losses, the process's peak memory and the summary.

    Raises:
        DemoError: a negative step count, a seed outside 0 .. 2**32-1, an eps outside (0, 1], or a
            ``plot`` file that exists already (all checked before any training) or cannot be written.
    """
    problems = [f"--{name} {value}: must be a non-negative integer"
                for name, value in (("pretrain-steps", pretrain_steps), ("steps", steps)) if value < 0]
    if not 0 <= seed <= 2**32 - 1:
        problems.append(f"--seed {seed}: must be in 0 .. {2**32 - 1}")
    try:
        WASIConfig(eps=eps, activation_eps=eps)
    except ValueError as err:
        problems.append(f"--eps {eps}: {err}")
    if plot is not None and Path(plot).exists():
        problems.append(f"--plot {str(plot)!r} already exists; it is kept: give a new file name")
    if problems:
        raise DemoError("; ".join(problems))
    threads = torch.get_num_threads()
    # the model's matrices are tiny: a second thread only adds synchronisation, and on a CPU other
    # jobs keep busy it made the demo several times slower
    torch.set_num_threads(1)
    try:
        return _run_demo(pretrain_steps, steps, eps, seed, plot, print_fn)
    finally:
        torch.set_num_threads(threads)


def _run_demo(pretrain_steps: int, steps: int, eps: float, seed: int, plot, print_fn) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    model = build_vit("vit-micro", num_classes=10)
    start = time.perf_counter()
    print_fn(f"pretraining a dense {sum(p.numel() for p in model.parameters()):,}-parameter ViT "
             f"on scikit-learn digits for {pretrain_steps} steps ...")
    dense_losses = _train(model, x_train, y_train, pretrain_steps, 3e-3, generator)
    dense_acc = _accuracy(model, x_test, y_test)
    print_fn(f"dense test accuracy: {dense_acc:.3f}")

    config = WASIConfig(eps=eps, activation_eps=eps, seed=seed)
    convert(model, config)
    print_fn(f"\nconverted the MLP linears with {config}\n")
    converted_acc = _accuracy(model, x_test, y_test)
    losses = _train(model, x_train, y_train, steps, 1e-3, generator)
    model.train()
    with count_saved_tensors(model) as counter:
        nn.functional.cross_entropy(model(x_train[:64]), y_train[:64])
    table = summary(model)
    print_fn(str(table))
    print_fn(f"\nmeasured saved tensors of one training step (batch 64, whole model): {counter.bytes / 1024:.1f} KiB")
    peak = process_peak_mb()
    print_fn(f"peak memory of this process so far (resident set, libraries included): {peak:.0f} MB")
    if steps:
        print_fn(f"\nWASI fine-tuning loss ({steps} steps):\n{_curve(losses, max(1, steps // 10))}")
    if plot is not None:
        print_fn(f"\nloss curves drawn to {plot_losses(dense_losses, losses, plot)}")
    final_acc = _accuracy(model, x_test, y_test)
    print_fn(f"\ntest accuracy: dense {dense_acc:.3f} -> converted {converted_acc:.3f} -> "
             f"after WASI fine-tuning {final_acc:.3f}   ({time.perf_counter() - start:.1f} s)")
    return {"dense_accuracy": dense_acc, "converted_accuracy": converted_acc,
            "final_accuracy": final_acc, "losses": losses, "dense_losses": dense_losses,
            "peak_mb": peak, "summary": table}
