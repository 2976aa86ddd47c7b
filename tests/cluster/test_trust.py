"""The trust boundary and the submitter's checks, without a cluster: what a worker refuses of a
job (rnnlab/cluster/trust.py), the trial's channel, every bad input of `rnnlab sweep` and `rnnlab
tune` as one line before anything starts, a search whose trials all fail, and TLS certificates
that a stranger's do not pass."""

from __future__ import annotations

import dataclasses
import json
import ssl
import threading
from pathlib import Path

import pytest

from rnnlab.cluster import security, trust, tune, worker
from rnnlab.cluster.job import Job
from rnnlab.errors import UserError
from rnnlab.training.trial import TRIAL_ENV, TrialRef, parse_trial

ROOT = Path(__file__).resolve().parents[2]
JOB = Job(name="grid-1a2b3c4", settings=("train.lr=0.1",), base="a" * 40,
          git_url="https://git.lab.example/lab.git",
          dvc_remote={"url": "s3://dvc-remote/rnnlab", "endpointurl": "http://10.0.0.2:9000"},
          tracking_uri="http://10.0.0.2:5050", sweep="0123456789ab", cpus=2)
TRIAL = TrialRef("postgresql+psycopg://db.lab.example/optuna_ann", "tune", 3, "median", "lstm")


def job(**changes) -> Job:
    return dataclasses.replace(JOB, **changes)


def test_a_job_of_plain_data_is_accepted():
    trust.accept(JOB)
    trust.accept(job(env=TRIAL.to_env(), targets=("evaluate@lstm",)))
    trust.accept(job(git_url="git@git.lab.example:lab/rnnlab.git", dvc_remote=None, tracking_uri=None))
    trust.accept(job(git_url="/srv/lab.git", dvc_remote={"url": "/srv/lab/.dvc/cache"},
                     tracking_uri="sqlite:////srv/lab/mlflow.db"))


@pytest.mark.parametrize("changes, why", [
    ({"env": {"LD_PRELOAD": "/tmp/evil.so"}}, "environment variable 'LD_PRELOAD': a job may set only RNNLAB_TRIAL"),
    ({"env": {"PYTHONPATH": "/tmp"}}, "environment variable 'PYTHONPATH'"),
    ({"env": {TRIAL_ENV: "postgresql://db/optuna tune 3 median"}}, "RNNLAB_TRIAL: not a trial (JSONDecodeError"),
    ({"dvc_remote": {"url": "s3://b/x\n[core]\n    no_scm = true"}}, "has a control character"),
    ({"dvc_remote": {"url": "s3://b/x", "credentialpath": "/etc/shadow"}}, "DVC remote keys"),
    ({"dvc_remote": {"url": "s3://b/x", "endpointurl": "http://h\nx"}}, "has a control character"),
    ({"git_url": "--upload-pack=touch /tmp/x"}, "an option or a command transport"),
    ({"git_url": "ext::sh -c touch% /tmp/x"}, "an option or a command transport"),
    ({"git_url": "https://ann:pw@git.lab.example/lab.git"}, "carries a login"),
    ({"git_url": "relative/path"}, "not https://"),
    ({"name": "../../etc"}, "name '../../etc': not a name"),
    ({"name": ".."}, "not a name"),
    ({"sweep": "x'; drop"}, "sweep id"),
    ({"base": "HEAD"}, "not a commit"),
    ({"settings": ("train.lr=0.1\n-S x=1",)}, "without control characters"),
    ({"targets": ("--force",)}, "not a stage name"),
    ({"cpus": -3}, "need cpus >= 1"),
    ({"gpus": -1}, "gpus >= 0"),
    ({"tracking_uri": "http://u:pw@10.0.0.2:5050"}, "carries a login"),
])
def test_a_job_that_is_more_than_data_is_refused_in_one_line(changes, why):
    with pytest.raises(UserError) as err:
        trust.accept(job(**changes))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "refused by the worker" in message
    assert why in message, message
    assert "pw@" not in message


def test_a_worker_refuses_before_it_clones(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNLAB_SWEEP_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(worker, "sh", lambda *a, **k: calls.append(a))
    with pytest.raises(UserError, match="grid-1a2b3c4: refused by the worker: environment variable 'LD_PRELOAD'"):
        worker.run(job(env={"LD_PRELOAD": "/tmp/evil.so"}))
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_a_workers_allow_lists_refuse_other_remotes(monkeypatch):
    monkeypatch.setenv(trust.GIT_ALLOW_ENV, "https://git.lab.example/* git@git.lab.example:lab/*")
    monkeypatch.setenv(trust.DVC_ALLOW_ENV, "s3://dvc-remote/*")
    trust.accept(JOB)
    trust.accept(job(git_url="git@git.lab.example:lab/rnnlab.git"))
    with pytest.raises(UserError, match=r"git remote 'https://evil.example/x.git' is not in this "
                                        r"worker's RNNLAB_WORKER_GIT_REMOTES \(https://git.lab"):
        trust.accept(job(git_url="https://evil.example/x.git"))
    with pytest.raises(UserError, match="DVC remote 's3://other/x' is not in this worker's RNNLAB_WORKER_DVC_REMOTES"):
        trust.accept(job(dvc_remote={"url": "s3://other/x"}))


def test_the_trial_travels_as_one_typed_value():
    assert parse_trial(TRIAL.to_env()[TRIAL_ENV]) == TRIAL
    for bad, why in (({**dataclasses.asdict(TRIAL), "number": "3"}, "number: an integer >= 0"),
                     ({**dataclasses.asdict(TRIAL), "study": "a b"}, "study: a name"),
                     ({**dataclasses.asdict(TRIAL), "storage": "postgresql://u:pw@h/db"}, "storage:"),
                     ({**dataclasses.asdict(TRIAL), "pruner": "x"}, "pruner: one of"),
                     ({"storage": "sqlite:///x"}, "missing")):
        with pytest.raises(UserError, match=why) as err:
            parse_trial(json.dumps(bad))
        assert len(str(err.value).splitlines()) == 1 and "pw@" not in str(err.value)


def test_supersede_matches_only_the_same_sweep_and_commit():
    f = worker.earlier_attempts(JOB)
    assert f == ("tags.`rnnlab.dvc_exp` = 'grid-1a2b3c4' and tags.`rnnlab.sweep` = '0123456789ab' "
                 f"and tags.`rnnlab.git_commit` = '{'a' * 40}'")


# --- the submitter's input: one line, exit status 2, before anything starts ----------------------

@pytest.fixture
def nothing_starts(monkeypatch):
    """The repository is this checkout; touching the tracking store, git or a cluster fails."""
    from rnnlab.cli import sweep as cli_sweep
    from rnnlab.cluster import sweep

    monkeypatch.chdir(ROOT)

    def started(*args, **kwargs):
        raise AssertionError("something started before the input was checked")

    monkeypatch.setattr(sweep, "where", started)
    monkeypatch.setattr(sweep, "ready_store", started)
    monkeypatch.setattr(cli_sweep, "cluster", started)


BAD = [
    (["tune", "--local", "1", "-P", "train.optimizer=choice([sgd,adam)"],
     "-P train.optimizer=choice([sgd,adam): '[sgd' is not a value"),
    (["tune", "--local", "1", "-P", "train.lr=uniform(0,1)", "-P", "train.lr=uniform(0,2)"],
     "train.lr is given twice"),
    (["tune", "--local", "1", "-P", "train.lr=uniform(0,1)", "--study", "my study"],
     "--study 'my study': not a name"),
    (["tune", "--local", "1", "-P", "train.lr=uniform(0,1)", "--study", "it's"], "not a name"),
    (["tune", "--local", "1", "-P", "train.lr=uniform(0,1)", "--max-failures", "0"],
     "--max-failures 0: give at least 1"),
    (["tune", "--local", "1", "-P", "train.nope=uniform(0,1)"],
     "-P train.nope=uniform(0,1): train.nope is not a key"),
    (["tune", "--local", "1", "-P", "train.lr=uniform(-1,1)"],
     "-P train.lr=uniform(-1,1): train.lr = -1.0: Input should be greater than 0"),
    (["sweep", "--local", "1", "--cpus", "0"], "--cpus 0: give at least 1"),
    (["sweep", "--local", "1", "--cpus", "-3", "--gpus", "-1"], "--cpus -3: give at least 1"),
    (["sweep", "--local", "1", "--gpus", "-1"], "--gpus -1: give 0 or more"),
    (["sweep", "--local", "1", "--name", ".."], "--name '..': not a name"),
    (["sweep", "--local", "1", "--name", "../x"], "not a name"),
    (["sweep", "--local", "1", "-S", "train.lr=0.1", "-S", "train.lr=0.2"], "train.lr given twice"),
    (["sweep", "--local", "1", "-S", "train.seed=range(0,40)", "-S", "train.lr=range(1,27)"],
     "-S: 1040 experiments (more than 1000); add --yes"),
    (["sweep", "--scheduler", "tcp://10.0.0.5:8786"], "plain TCP lets anyone who reaches the scheduler"),
    (["sweep", "--scheduler", "10.0.0.5:8786"], "plain TCP"),
    (["sweep", "--scheduler", "ws://10.0.0.5:8786"], "ws:// is not supported"),
]


@pytest.mark.parametrize("argv, line", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_every_bad_input_is_one_line_before_anything_starts(argv, line, nothing_starts, capsys):
    from rnnlab.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and line in err, err


def test_insecure_says_who_can_run_code(capsys):
    assert security.check_address("tcp://10.0.0.5:8786", insecure=True) == "tcp://10.0.0.5:8786"
    assert ("warning: --insecure: anyone who can reach tcp://10.0.0.5:8786 can run code on its "
            "workers") in capsys.readouterr().err
    assert security.check_address("tls://10.0.0.5:8786", insecure=False) == "tls://10.0.0.5:8786"


def test_a_tls_scheduler_without_a_client_certificate_is_one_line(monkeypatch, tmp_path):
    import dask
    import distributed  # noqa: F401 - its config's defaults, before set() saves what to restore

    with dask.config.set({k: None for k in security.CONFIG_KEYS}):
        with pytest.raises(UserError, match="no client certificate for a TLS scheduler: give --tls-ca-file"):
            security.client_security(None, None, None)
        with pytest.raises(UserError, match="go together"):
            security.client_security(str(tmp_path / "ca.pem"), None, None)
        with pytest.raises(UserError, match="no such certificate or key file"):
            security.client_security(*(str(tmp_path / f) for f in ("ca.pem", "a.pem", "a-key.pem")))


# --- a search whose trials fail ends -------------------------------------------------------------

class FailingFuture:
    status = "error"

    def __init__(self, name: str):
        self.name = name

    def done(self) -> bool:
        return True

    def exception(self):
        return UserError(f"{self.name}: cannot run it: train.num_steps = 100000 does not fit")


class FailingClient:
    """A cluster of two 1-core workers on which every trial fails."""

    def __init__(self):
        self.submitted = []

    def submit(self, fn, job, **kwargs):
        self.submitted.append(job.name)
        return FailingFuture(job.name)

    def subscribe_topic(self, topic, handler):
        pass

    def scheduler_info(self):
        return {"workers": {"a": {"resources": {"cpus": 1}}, "b": {"resources": {"cpus": 1}}}}


@pytest.mark.parametrize("trials, most, in_a_row, submitted, why", [
    (3, 3, 5, 3, "(--max-failures 3); 3 of them: cannot run it: train.num_steps = 100000 does not fit"),
    (50, 50, 4, 4, "(4 in a row)"),
    (10, 2, 5, 2, "(--max-failures 2)"),
])
def test_a_search_whose_trials_all_fail_ends_naming_the_failure(tmp_path, monkeypatch, trials, most,
                                                                 in_a_row, submitted, why):
    import optuna
    from optuna.distributions import FloatDistribution

    from rnnlab.cluster import sweep

    monkeypatch.setattr(sweep, "POLL_SECONDS", 0)
    storage = f"sqlite:///{tmp_path}/study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="tune", storage=storage)
    plan = sweep.Plan(tmp_path, "a" * 40, "/origin", True, {"url": "/c"}, "sqlite:///m.db", 1, 0,
                      sweep="0123456789ab")
    s = tune.Study(study, storage, "rnn", plan, {"train.lr": FloatDistribution(0.1, 1)}, "none")
    client = FailingClient()
    with pytest.raises(UserError) as err:
        tune.run(s, client, trials, slots=2, failures=tune.Failures(most, in_a_row))
    assert len(client.submitted) == submitted
    assert str(err.value).startswith(f"tune: stopped after {submitted} failed trial(s) ") and why in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert [t.state.name for t in study.trials] == ["FAIL"] * submitted


# --- certificates --------------------------------------------------------------------------------

def test_certificates_of_the_lab_pass_a_strangers_do_not(tmp_path):
    """A TLS server that asks for a client certificate of the lab's CA, as Dask's does: a client
    with the lab's certificate is let in; with none, or with one of another CA, the handshake
    fails."""
    import socket

    lab = tmp_path / "lab"
    written = security.make_certs(lab, ["ann"], ["10.0.0.5"])
    assert {p.name for p in written} >= {"ca.pem", "ca-key.pem", "scheduler.pem", "worker-key.pem",
                                         "ann.pem", "ann-key.pem", "ann.dask.yaml"}
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in written if p.name.endswith("-key.pem"))
    assert security.make_certs(lab, ["ann"], []) == []  # kept, not made again
    assert [p.name for p in security.make_certs(lab, ["bob"], [])] == ["bob.pem", "bob-key.pem", "bob.dask.yaml"]
    security.make_certs(tmp_path / "other", ["eve"], [])

    sec = security.client_security(str(lab / "ca.pem"), str(lab / "scheduler.pem"), str(lab / "scheduler-key.pem"))
    server_ctx = sec.get_listen_args("client")["ssl_context"]  # Dask's own context
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        for _ in range(3):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"in")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def connect(folder: Path, name: str | None) -> bytes:
        ctx = ssl.create_default_context(cafile=str(lab / "ca.pem"))
        ctx.check_hostname = False
        if name:
            ctx.load_cert_chain(folder / f"{name}.pem", folder / f"{name}-key.pem")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                return tls.recv(2)

    assert connect(lab, "ann") == b"in"
    for folder, name in ((lab, None), (tmp_path / "other", "eve")):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            assert connect(folder, name) != b"in"
    thread.join(timeout=10)
    listener.close()


def test_a_tracking_uri_with_a_password_is_refused_before_it_travels(monkeypatch):
    from rnnlab.cluster import sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:planted-pw@db.lab.example/mlflow")
    with pytest.raises(UserError) as err:
        sweep.sweep_tracking_uri(ROOT, local=False)
    message = str(err.value)
    assert "carries a login" in message and "planted-pw" not in message
    assert len(message.splitlines()) == 1
