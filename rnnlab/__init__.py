"""rnnlab: the RNN language models of Dive into Deep Learning as a reproducible DVC + MLflow
pipeline. The library that the DVC stages (stages/) and the `rnnlab` command call, by layer:

    cli/       the `rnnlab` command, one module per subcommand, and the presets
    cluster/   sweeps and searches on a Dask cluster
    tracking/  MLflow runs, DVC's metrics files and their mirror, the MLflow Model, the table
    training/  the epoch loop, checkpoints, resume, sampling, threads, precision, trials
    models/    every variant behind one interface, and which path runs a stack
    kernels/   the fast CPU paths (fused, native, softmax) and the measured choice among them
    data/      a corpus fetched, tokenised, numbered and batched (corpora/: the built-in ones)
    config.py  the params schema, read by all; errors, fileio, redact, phases and codedeps beside
"""

__version__ = "0.1.0"
