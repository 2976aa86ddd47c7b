"""Models: every variant of the book behind one interface, `model(idx, state) -> logits, state`.

    lm.py         the language model, its config, and the factory: the one place that branches
                  on cell and impl
    scratch.py    impl scratch: the book's cells from explicit parameters
    concise.py    impl torch: nn.RNN / nn.GRU / nn.LSTM
    dispatch.py   the contract every stack keeps, and which path (reference, fused, native) runs it
"""
