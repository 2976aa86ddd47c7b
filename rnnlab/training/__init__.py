"""Training: the epoch loop and what it leaves behind.

    loop.py         truncated BPTT, clipping, the learning-rate schedule, perplexity, the device
    threads.py      `train.threads: auto`: the cores shared among parallel trainings
    checkpoint.py   weights + model config + vocabulary, loadable without the training code
    resume.py       a training killed part-way continues from its last complete epoch
    sampling.py     text from a trained model: greedy and sampled continuation of a prefix
"""
