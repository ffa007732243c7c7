"""Training runs: a run's settings, the one preparation of its data and model (``pipeline``), the
one training step (``step``), the loop, the run checkpoint (``state``), the output folder
(``outputs``), the methods, the models and the causal-LM task; ``wasi bench`` and the command
fronts in ``wasi.cli`` are built on them."""
