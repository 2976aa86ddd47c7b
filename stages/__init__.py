"""The DVC stages of dvc.yaml, one module each: parse paths, load params, call rnnlab."""
