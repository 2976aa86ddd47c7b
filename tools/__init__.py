"""Maintainers' tools, run from the checkout: lock.py (requirements.lock), mutations.py (break the
code on purpose, see a test fail), tinyrepo.py (the tiny copies that tests and bench/ run in)."""
