"""Data: from a corpus to minibatches.

    fetch.py      one file from a URL or a path, checked against its sha1 (retries, progress)
    download.py   the download stage's work: a corpus fetched, checked and laid out in data/raw
    text.py       normalisation, line ends, tokenisation
    vocab.py      the vocabulary: token <-> id, from the training split only
    corpus.py     the tokenize stage's work: splits, token ids and vocabulary on disk
    batches.py    the book's sequential and random minibatches
"""
