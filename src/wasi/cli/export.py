"""``wasi export`` and ``wasi predict``: their arguments and handlers (the work is in :mod:`wasi.export`).

Nothing heavy is imported at module level: registering the parsers leaves ``wasi --help`` fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wasi.cli.usage import UsageError, parse_numbers

FORMATS = ("onnx", "executorch")
SPLITS = ("train", "val", "test", "all")
CHECK_SAMPLES = 16
# largest |ONNX Runtime - PyTorch| of the fp32 export accepted, relative to max(1, max |logit|)
TOLERANCE = 1e-3
EXECUTORCH_NEEDS = (
    "--format executorch is not built: ExecuTorch (`executorch` on PyPI, 1.5.1) lowers a torch.export graph "
    "through to_edge and the XNNPACK delegate and needs its own runtime build, torchao 0.18, coremltools and "
    "pandas besides; export to ONNX instead (--format onnx)"
)


def _usage(message: str) -> UsageError:
    return UsageError(message)


def add_export_parser(subparsers: argparse._SubParsersAction, **common) -> argparse.ArgumentParser:
    """Register ``export`` on the ``wasi`` command's subparsers (``common``: the epilog and formatter
    every command shares); returns its parser."""
    parser = subparsers.add_parser(
        "export", help="export a trained run's model to ONNX (low-rank form, fp32 and int8), checked against PyTorch",
        description="Rebuild the model of a `wasi train` run folder and export it to ONNX: each WASI layer as its "
                    "two thin matmuls, batch and sequence axes dynamic, the tokenizer or image preprocessing "
                    "stored in the file's metadata (for `wasi predict`). The export is run with ONNX Runtime on "
                    "the run's test samples and compared with the PyTorch model.",
        **common,
    )
    parser.add_argument("run_dir", help="a `wasi train --out` folder")
    parser.add_argument("--format", default="onnx", help="onnx (default); executorch says what it needs")
    parser.add_argument("--out", required=True, help="the .onnx file to write (a new file)")
    parser.add_argument("--int8", action="store_true",
                        help="also write the int8 variant (ONNX Runtime dynamic quantization, per-channel int8 "
                             "weights) beside --out as NAME.int8.onnx, and compare it too")
    parser.add_argument("--dense", action="store_true",
                        help="merge each WASI layer to one dense weight (L R) instead of two thin factors "
                             "(for comparison; the low-rank form is the default)")
    parser.add_argument("--check-samples", default=str(CHECK_SAMPLES),
                        help=f"test samples (causal LM: token windows) the export is checked on (default "
                             f"{CHECK_SAMPLES})")
    parser.add_argument("--cache-dir", default=None,
                        help="data and converted-model cache folder (default $WASI_CACHE, else ~/.cache/wasi/data)")
    parser.set_defaults(func=cmd_export)
    return parser


def add_predict_parser(subparsers: argparse._SubParsersAction, **common) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``wasi`` command's subparsers (``common``: the epilog and formatter
    every command shares); returns its parser."""
    parser = subparsers.add_parser(
        "predict", help="score files or a dataset split with a trained run or its ONNX export",
        description="Score data with a run folder's model (PyTorch) or an exported .onnx file (ONNX Runtime), "
                    "fed with the run's tokenizer or image preprocessing. Labelled data prints the accuracy (a "
                    "causal LM: the perplexity); --out writes one prediction per sample.",
        **common,
    )
    parser.add_argument("model", help="a `wasi train --out` folder, or an .onnx file written by `wasi export`")
    parser.add_argument("--data", required=True, nargs="+",
                        help="a dataset as for `wasi train` (name, class_name/*.png folder, labelled CSV/JSONL), "
                             "or image / .txt files to predict without labels; a causal LM: brown, a folder of "
                             ".txt files, or .txt files")
    parser.add_argument("--split", default=None,
                        help="train, val, test (the run's seeded 80/10/10 cut) or all (default: test for the "
                             "run's own data, all for other data)")
    parser.add_argument("--out", default=None,
                        help="write the predictions to this new .csv or .jsonl file (default: print them when "
                             "the data has no labels)")
    parser.add_argument("--batch-size", default="32", help="samples per forward (default 32; a causal LM: at most 8)")
    parser.add_argument("--max-samples", default=None,
                        help="score only the first this many samples (a causal LM: token windows)")
    parser.add_argument("--threads", default="1", help="ONNX Runtime intra-op threads for an .onnx file (default 1)")
    parser.add_argument("--cache-dir", default=None,
                        help="data and converted-model cache folder (default $WASI_CACHE, else ~/.cache/wasi/data)")
    parser.set_defaults(func=cmd_predict)
    return parser


def _positive(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    values, errors = parse_numbers(args, names, ())
    for name, value in values.items():
        if value is not None and value < 1:
            errors.append(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    if errors:
        raise UsageError.listing(errors)
    return values


def cmd_export(args: argparse.Namespace) -> int:
    """Export, check against PyTorch, optionally quantize; prints the checks. Returns 0."""
    numbers = _positive(args, ("check_samples",))
    if args.format not in FORMATS:
        raise _usage(f"--format {args.format!r}: choose onnx")
    if args.format == "executorch":
        raise _usage(EXECUTORCH_NEEDS)
    out = Path(args.out)
    int8 = out.with_name(out.stem + ".int8.onnx")
    errors = []
    if out.suffix.lower() != ".onnx":
        errors.append(f"--out {args.out!r}: give a .onnx file")
    for path in (out, int8) if args.int8 else (out,):
        if path.exists():
            errors.append(f"{str(path)!r} already exists; remove it or give another --out")
    if not out.parent.is_dir():
        errors.append(f"--out {args.out!r}: the folder {str(out.parent)!r} does not exist")
    if errors:
        raise _usage("\n  ".join(["invalid arguments:", *errors]) if len(errors) > 1 else errors[0])
    try:
        from wasi.export.onnx import ExportError, export_onnx, max_abs_difference, preprocessing_metadata
        from wasi.export.predict import PredictError, check_batch, load_run
        from wasi.export.quantize import quantize_int8
    except ImportError as err:
        raise _usage(str(err)) from None
    try:
        scorer = load_run(args.run_dir, cache_dir=args.cache_dir)
        example, what = check_batch(scorer, numbers["check_samples"], cache_dir=args.cache_dir)
        meta = preprocessing_metadata({**scorer.feeder.describe(), "tokenizer": scorer.feeder.tokenizer_json()})
        export_onnx(scorer.model, example, out, dense=args.dense, metadata=meta)
        diff, scale = max_abs_difference(out, scorer.model, example), _scale(scorer, example)
        form = "dense" if args.dense else "low-rank"
        print(f"wrote {out} ({form}, fp32, {out.stat().st_size / 2**20:.1f} MiB); on {what}: max |ONNX Runtime - "
              f"PyTorch| = {diff:.3g} (largest |logit| {scale:.3g})")
        if diff > TOLERANCE * max(1.0, scale):
            raise _usage(f"{out}: the export differs from PyTorch by {diff:.3g}, more than {TOLERANCE:g} x "
                         f"max(1, {scale:.3g}); the file is kept for inspection")
        if args.int8:
            quantize_int8(out, int8)
            diff8, agree = _int8_check(int8, scorer, example)
            print(f"wrote {int8} (int8, {int8.stat().st_size / 2**20:.1f} MiB); on {what}: max |int8 - PyTorch| = "
                  f"{diff8:.3g}, same top prediction on {agree:.1%} of the positions")
    except (ExportError, PredictError, FileExistsError, ImportError) as err:
        raise _usage(str(err)) from None
    return 0


def _scale(scorer, example) -> float:
    import torch

    from wasi.export.onnx import as_inputs

    names, inputs, _ = as_inputs(example)
    with torch.no_grad():
        logits = scorer.logits({"images": inputs[0]} if scorer.feeder.kind == "image" else dict(zip(names, inputs)))
    return float(logits.abs().max())


def _int8_check(path: Path, scorer, example) -> tuple[float, float]:
    import torch

    from wasi.export.onnx import as_inputs, run_session, session

    names, inputs, _ = as_inputs(example)
    feed = dict(zip(names, inputs))
    got = run_session(session(path), feed)
    with torch.no_grad():
        expected = scorer.logits({"images": inputs[0]} if scorer.feeder.kind == "image" else feed)
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    return float((got - expected).abs().max()), float(agree)


def cmd_predict(args: argparse.Namespace) -> int:
    """Score the data; prints the accuracy or perplexity, writes or prints the predictions. Returns 0."""
    numbers = _positive(args, ("batch_size", "max_samples", "threads"))
    if args.split is not None and args.split not in SPLITS:
        raise _usage(f"--split {args.split!r}: choose one of {', '.join(SPLITS)}")
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() not in (".csv", ".jsonl"):
            raise _usage(f"--out {args.out!r}: predictions are written as .csv or .jsonl")
        if out.exists():
            raise _usage(f"--out {args.out!r} already exists; remove it or give another file")
    try:
        from wasi.export.onnx import ExportError
        from wasi.export.predict import PredictError, open_scorer, score, write_rows
    except ImportError as err:
        raise _usage(str(err)) from None
    try:
        scorer = open_scorer(args.model, cache_dir=args.cache_dir, threads=numbers["threads"])
        scored = score(scorer, args.data, split=args.split, batch_size=numbers["batch_size"],
                       max_samples=numbers.get("max_samples"), cache_dir=args.cache_dir)
        if args.out is not None:
            write_rows(scored.rows, args.out)
    except (PredictError, ExportError, ImportError) as err:
        raise _usage(str(err)) from None
    unit = "token windows" if scorer.feeder.task == "causal-lm" else "samples"
    if scored.metric:
        print(f"{scored.metric} {scored.value:.4f} on {scored.count} {unit} ({scored.what})")
    elif args.out is None:
        for row in scored.rows:
            print(f"{row['source']}\t{row['prediction']}\t{row['probability']:.4f}")
    if args.out is not None:
        print(f"wrote {scored.count} predictions to {args.out}")
    return 0


__all__ = ["add_export_parser", "add_predict_parser", "cmd_export", "cmd_predict"]
