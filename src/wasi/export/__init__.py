"""Serving a trained model outside this package: ONNX export (fp32 and int8) and batch prediction.

``wasi.export_onnx`` is :func:`wasi.export.onnx.export_onnx`; ``wasi export`` and ``wasi predict``
front the rest (:mod:`wasi.cli.export`). Nothing is imported here, so that registering the
commands does not load torch.
"""
