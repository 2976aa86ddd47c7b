"""Training: the epoch loop and what it leaves behind.

    loop.py         truncated BPTT, clipping, the learning-rate schedule, perplexity, the device
    precision.py    `train.bf16`: float32 or bfloat16 autocast, measured per model under auto
    threads.py      `train.threads: auto`: the cores shared among parallel trainings
    checkpoint.py   weights + model config + vocabulary, loadable without the training code
    resume.py       a training killed part-way continues from its last complete epoch
    sampling.py     text from a trained model: greedy and sampled continuation of a prefix
    trial.py        an Optuna trial's view of a training: a report per epoch, maybe pruning
"""
