"""Kernels: the fast paths of the recurrent layers and the output layer on the CPU, and which
of them runs, chosen by measurement on each machine.

    choice.py         which code runs: measured per machine and shape, cached outside the repo
    cpu.py            what this CPU is (family/model/stepping, ISA), for the caches' keys
    fused.py          the rnn and gru time loops as one autograd op each, backward by hand
    native.py         the same loops (and nn.LSTM's) compiled from csrc/recurrence.cpp
    softmax.py        the output layer and its cross-entropy in one step, for large vocabularies
"""
