"""The DVC stages of dvc.yaml, one module each: parse paths, load params, call rnnlab.

The library names no stage module: what it must know of them, a stage hands down from here."""

TRAIN, EVALUATE = "stages.train", "stages.evaluate"
TORCH_STAGES = (TRAIN, EVALUATE)  # the stages whose processes share the CPUs (train.threads: auto)
