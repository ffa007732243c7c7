"""A run's output folder: whole-or-nothing files, the metrics log, the trained model, the curves."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from wasi.checkpoint import safetensors_os_errors, save
from wasi.convert import unconvert, wasi_layers
from wasi.files import fsync_dir, fsync_file, remove_quietly
from wasi.training.measure import median
from wasi.training.models import save_pretrained_vit
from wasi.training.settings import RunError
from wasi.training.state import CHECKPOINT_FILE

METRICS_FILE = "metrics.jsonl"


class RunFiles:
    """The files of the run in ``folder``; every failed write is a :class:`RunError` naming the file,
    the step (read from ``step``) and how to go on."""

    def __init__(self, folder: Path, step: Callable[[], int]) -> None:
        self.folder = folder
        self.step = step

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def metrics(self) -> Path:
        return self.folder / METRICS_FILE

    def check_writable(self) -> None:
        """Create the folder and try a file in it.

        Raises:
            RunError: the folder cannot be written.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise RunError(f"--out {str(self.folder)!r} is not writable: {err.strerror or err}") from None

    def recovery(self) -> str:
        """What a user does after a failed write: the run continues from its last checkpoint."""
        if self.checkpoint.is_file():
            return f"{self.checkpoint} is intact: free some space and continue with --resume"
        return "there is no checkpoint yet: free some space and start again"

    def write_failed(self, what: Path, err: BaseException) -> RunError:
        code = getattr(err, "errno", None)  # wasi.save's OSError carries a sentence of its own
        reason = os.strerror(code) if code else (str(err).splitlines() or [type(err).__name__])[0]
        return RunError(f"could not write {what} at step {self.step()}: {reason}; {self.recovery()}")

    def write_file(self, path: Path, write: Callable[[Path], None]) -> None:
        """Write one output file completely or not at all: temporary name, fsync, rename.

        Raises:
            RunError: the write failed (disk full, folder gone); no partial file is left.
        """
        tmp = path.with_name(path.name + ".tmp")
        try:
            write(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as err:  # Ctrl-C too: no temporary file is left behind
            remove_quietly(tmp)
            if isinstance(err, OSError):
                raise self.write_failed(path, err) from None
            raise

    def append_metric(self, record: dict) -> None:
        """Append one JSON line to the metrics log; a failed write leaves no half line."""
        path = self.metrics
        try:
            size = path.stat().st_size
        except OSError:
            size = None
        try:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
        except OSError as err:
            try:  # no half line: the file goes back to its last whole record
                if size is None:
                    path.unlink()
                else:
                    os.truncate(path, size)
            except OSError:
                pass  # a half line left here is dropped by --resume
            raise self.write_failed(path, err) from None

    def read_metrics(self) -> list[dict]:
        """The whole records of the metrics log (a line cut short by a killed run is dropped)."""
        records = []
        if self.metrics.is_file():
            for line in self.metrics.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run logs the later ones again)."""
        if self.metrics.is_file():
            kept = [json.dumps(r) for r in self.read_metrics() if isinstance(r.get("step"), int) and r["step"] <= step]
            self.write_file(self.metrics, lambda tmp: tmp.write_text("".join(k + "\n" for k in kept)))

    def write_json(self, path: Path, data: dict) -> None:
        self.write_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))

    def export_vit(self, model: torch.nn.Module) -> None:
        """``wasi pretrain``: the ViT as a folder ``wasi train --model`` loads."""
        target = self.folder / "model.safetensors"
        try:
            with safetensors_os_errors(target):
                save_pretrained_vit(model, self.folder)
        except OSError as err:
            raise self.write_failed(target, err) from None

    def export_wasi(self, model: torch.nn.Module) -> None:
        """A WASI model as ``wasi.save`` writes it, in ``model/``."""
        try:
            save(model, self.folder / "model")
        except OSError as err:
            raise self.write_failed(self.folder / "model", err) from None

    def export_weights(self, model: torch.nn.Module) -> None:
        """A dense model's weights as ``model/model.safetensors``."""
        from safetensors.torch import save_model

        folder = self.folder / "model"
        try:
            folder.mkdir(exist_ok=True)
        except OSError as err:
            raise self.write_failed(folder, err) from None

        def write(tmp: Path) -> None:
            with safetensors_os_errors(tmp):
                save_model(model, str(tmp))

        self.write_file(folder / "model.safetensors", write)

    def export_transformers(self, model: torch.nn.Module, tokenizer) -> None:
        """``transformers/``: a trained causal LM as a plain folder ``transformers`` loads.

        WASI layers are merged back into dense ones (``wasi.unconvert``, in place: the run is
        over), LoRA adapters into their base weights; the tokenizer is saved beside. The folder is
        written under a temporary name and renamed, so a failed write (disk full) leaves none.

        Raises:
            RunError: the folder could not be written (named), with how to go on.
        """
        if hasattr(model, "merge_and_unload"):  # LoRA
            model = model.merge_and_unload()
        elif wasi_layers(model):
            unconvert(model)
        folder = self.folder / "transformers"
        tmp = folder.with_name(folder.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(folder, ignore_errors=True)  # a resumed run's earlier export
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
        except BaseException as err:  # Ctrl-C too: no temporary folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise self.write_failed(folder, err) from None
            raise

    def write_curves(self, fig) -> None:
        """``curves.png`` from a matplotlib figure (closed afterwards)."""
        try:
            self.write_file(self.folder / "curves.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)


def grad_cosine_summary(records: list[dict]) -> dict | None:
    """Per layer: min, median and last measured gradient cosine and the number of probes (None: none)."""
    per_layer: dict[str, list[float]] = {}
    for record in records:
        for name, value in record["grad_cosine"].items():
            per_layer.setdefault(name, []).append(value)
    if not per_layer:
        return None
    return {name: {"min": min(v), "median": median(v), "last": v[-1], "probes": len(v)}
            for name, v in per_layer.items()}


def draw_curves(method: str, loss_history: list[tuple[int, float]], val_history: list[dict],
                metric: str = "accuracy", cosines: list[dict] | None = None):
    """The training loss, each WASI layer's gradient cosine (when ``cosines``, the metrics'
    ``grad_cosine`` records, are given) and the validation ``metric`` against the step.

    Each logged value is drawn as a point, joined by lines: a short run's single value still shows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if cosines else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax1, ax2 = axes[0], axes[-1]
    if loss_history:
        steps, losses = zip(*loss_history)
        ax1.plot(steps, losses, "o-", markersize=3)
    ax1.set(xlabel="step", ylabel="training loss", title=f"{method}: loss")
    if cosines:  # beside the loss: one line per layer
        ax = axes[1]
        series: dict[str, list[tuple[int, float]]] = {}
        for record in cosines:
            for name, value in record["grad_cosine"].items():
                series.setdefault(name, []).append((record["step"], value))
        for name, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", linewidth=0.8, label=name if len(series) <= 12 else None)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set(xlabel="step", ylabel="cosine to the exact gradient", ylim=(-1.05, 1.05),
               title=f"{method}: weight-gradient fidelity")
        if len(series) <= 12:
            ax.legend(fontsize=6)
    points = [(r["step"], r[f"val_{metric}"]) for r in val_history if f"val_{metric}" in r]
    if points:
        ax2.plot(*zip(*points), "o-")
    ax2.set(xlabel="step", ylabel=f"validation {metric}", title=f"{method}: {metric}")
    fig.tight_layout()
    return fig
