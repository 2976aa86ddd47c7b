"""The MLflow UI in a real browser (headless Chromium driven by playwright-core, tests/ui/): after
a real `dvc repro`, each training run's Models column links its logged model, the model's page
names its run, and the compare view shows the runs' params and metrics.

Needs Node.js, Debian's `chromium` (.ci/run installs it) and `npm ci --prefix tests/ui` (make test); in CI
RNNLAB_NO_SKIPS=1 makes their absence a failure, elsewhere a skip that says what to install.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.repos import mlflow_server

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "tests" / "ui"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.slow


def require_browser() -> None:
    missing = [what for what, ok in (
        ("Node.js (node)", shutil.which("node")),
        (f"Chromium at {CHROMIUM} (apt-get install chromium)", Path(CHROMIUM).exists()),
        ("playwright-core (npm ci --prefix tests/ui)", (UI / "node_modules" / "playwright-core").is_dir()),
    ) if not ok]
    if missing:
        pytest.skip("the browser check needs " + ", ".join(missing))


@pytest.fixture(scope="module")
def server(tmp_path_factory, pipeline):
    """The session's tiny pipeline run (its own copy), and `mlflow server` on its store."""
    require_browser()
    repo = pipeline.copy(tmp_path_factory.mktemp("ui") / "repo")
    with mlflow_server(f"sqlite:///{repo}/mlflow.db", repo) as started:
        yield started.url


def test_the_models_column_links_each_runs_model_and_compare_shows_the_runs(server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("timemachine-char")
    runs = client.search_runs([experiment.experiment_id])
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["lstm", "rnn_scratch"]
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in runs)

    proc = subprocess.run(
        ["node", str(UI / "check_models.mjs"), server, experiment.experiment_id,
         ",".join(r.info.run_id for r in runs), ",".join(m.model_id for m in models), str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr, file=sys.stderr)
    assert proc.stdout.strip(), f"the browser check printed nothing (exit {proc.returncode}):\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["failures"] == [], result
    linked = {link["href"].rsplit("/", 1)[-1] for link in result["model_links"] if link["text"] == "model"}
    assert linked == {m.model_id for m in models}
    assert result["model_page_run"] == next(m.source_run_id for m in models
                                            if m.model_id == models[0].model_id)
    assert {"train.lr", "best_val_ppl", "test_ppl"} <= set(result["compare_has"])
    for shot in ("runs-table.png", "model.png", "compare.png"):
        data = (tmp_path / shot).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 20_000, shot
