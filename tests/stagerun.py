"""The pipeline's stages run as DVC runs them (`python -m stages.<name> ARGS`), on tiny data.

    stage(...)        a subprocess: where the process is what a test is about (its exit status
                      under a kill or a signal, its environment, what a fresh interpreter loads)
    in_process(...)   the same `main()` through the same `run_main`, in this process: exit
                      status, stdout and stderr as a subprocess would give them, without the
                      seconds of a new interpreter importing torch and MLflow

Both return a subprocess.CompletedProcess. An exception that `run_main` does not turn into an
`error:` line (a traceback, in a subprocess) propagates out of `in_process` and fails the test.
The session's fixtures `tiny_tokens` and `tiny_trained` (conftest.py) are built with these.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import yaml

from rnnlab.errors import run_main
from tests.conftest import shipped_params

ROOT = Path(__file__).resolve().parents[1]

# Tiny settings (the rest from params.yaml): a 12-unit model on 4,000 training tokens trains an
# epoch in a fraction of a second.
TINY = shipped_params({
    "data": {"corpus": "timemachine", "max_tokens": 4000},
    "tokenize": {"token": "char"},
    "train": {"lr": 0.01, "clip_theta": 1.0, "num_steps": 8, "hidden_size": 12, "batch_size": 4,
              "epochs": 2, "optimizer": "adam", "lr_schedule": "cosine", "device": "cpu",
              "threads": 1},
    "variants": {"rnn": {"cell": "rnn"}, "lstm": {"cell": "lstm"}},
    "evaluate": {"prefixes": ["time traveller"], "num_tokens": 8, "num_samples": 1},
    "tracking": {"enabled": False},
})


def stage_env(**extra: str) -> dict[str, str]:
    """A stage's environment: this one's (the test run's kernel cache included), the project
    importable, telemetry off, no tracking URI or DVC experiment inherited; `extra` on top."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_EXP_NAME", None)
    return {**env, **extra}


def tiny_params(**sections) -> dict:
    """TINY with some settings changed: tiny_params(train={"lr": 5.0}) merges into `train`."""
    p = copy.deepcopy(TINY)
    for section, values in sections.items():
        p[section] = {**p[section], **values} if isinstance(values, dict) else values
    return p


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage(name: str, *args, cwd: Path, env: dict | None = None, check: bool = False,
          timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m stages.<name> ARGS` in `cwd` as DVC would run it."""
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}", *map(str, args)], cwd=cwd,
                          env=env or stage_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def in_process(name: str, *args, cwd: Path, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """stages.<name>.main() under run_main, as `stage` runs it, in this process: the working
    directory, environment and argv are the stage's for the call, and everything a stage changes
    in the process (torch's threads, MLflow's URI, this process's kernel decisions) is put back."""
    import torch

    from rnnlab.kernels import choice

    module = importlib.import_module(f"stages.{name}")
    argv = [f"stages/{name}.py", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    threads = torch.get_num_threads()
    choice.forget()  # a fresh process has decided nothing yet
    os.environ.clear()
    os.environ.update(env or stage_env())
    os.chdir(cwd)
    sys.argv = argv
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_main(module.main)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        choice.forget()
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(None)
    proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def one_error(proc: subprocess.CompletedProcess) -> str:
    """A user mistake: exit 2, exactly one `error:` line, no traceback. Returns that line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def train_args(folder: Path, data: Path, variant: str = "rnn", params: Path | None = None) -> list:
    return ["--params", params or folder / "params.yaml", "--variant", variant, "--data", data,
            "--out", folder / "models" / variant, "--curves", folder / "curves" / f"{variant}.csv",
            "--work", folder / "checkpoints" / variant]


def eval_args(folder: Path, data: Path, model: Path, variant: str = "rnn", out: Path | None = None) -> list:
    out = out or folder
    return ["--params", folder / "params.yaml", "--variant", variant, "--data", data,
            "--model", model, "--metrics", out / "metrics" / f"{variant}.json",
            "--samples", out / "samples" / f"{variant}.md"]
