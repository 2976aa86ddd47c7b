"""The parts the bench programs share (bench/__init__.py lists the programs). ROOT: the repository,
whose params.yaml and committed code the programs measure."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
