"""rnnlab/redact.py: what a shown URI keeps and what it hides; which settings values are refused."""

from __future__ import annotations

import pytest
import yaml

from rnnlab.config import load_params
from rnnlab.errors import UserError
from rnnlab.redact import credentials_in, public_text, public_uri
from tests.conftest import shipped_params


@pytest.mark.parametrize("uri, shown", [
    ("http://ann:s3cret@127.0.0.1:5050", "http://ann:***@127.0.0.1:5050"),
    ("https://ann:s3cret@mlflow.example.org/base/?x=1", "https://ann:***@mlflow.example.org/base/?x=1"),
    ("https://ghp_s3cret@github.com/lab/c.zip", "https://***@github.com/lab/c.zip"),  # a token as user
    ("ssh://git@github.com/lab/repo.git", "ssh://git@github.com/lab/repo.git"),  # a name, no secret
    ("postgresql+psycopg://optuna@db:5432/optuna", "postgresql+psycopg://optuna@db:5432/optuna"),
    ("http://127.0.0.1:5050", "http://127.0.0.1:5050"),
    ("http://ann:s3cret@[::1]:5050/x", "http://ann:***@[::1]:5050/x"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("postgresql+psycopg://mlflow:s3cret@db:5432/mlflow", "postgresql+psycopg://mlflow:***@db:5432/mlflow"),
    ("https://b.s3.amazonaws.com/c.zip?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=s3cret",
     "https://b.s3.amazonaws.com/c.zip?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://a.blob.core.windows.net/c/x.zip?sv=2024&se=2026&sig=s3cret",
     "https://a.blob.core.windows.net/c/x.zip?sv=2024&se=2026&sig=***"),
    ("https://h/c.txt?page=2;lang=en", "https://h/c.txt?page=2;lang=en"),  # nothing secret: as written
    ("/data/corpus.txt", "/data/corpus.txt"),
])
def test_public_uri_hides_passwords_and_signatures_and_nothing_else(uri, shown):
    assert public_uri(uri) == shown


def test_public_text_masks_every_uri_inside_a_message():
    text = "GET https://ann:s3cret@h/a?token=t0k failed; retried http://h/b?sig=x9 'ok'"
    assert public_text(text) == "GET https://ann:***@h/a?token=*** failed; retried http://h/b?sig=*** 'ok'"


@pytest.mark.parametrize("uri, what", [
    ("https://ann:s3cret@h/c.zip", "a login (user:password@"),
    ("https://ghp_s3cret@github.com/lab/c.zip", "a login (user@"),
    ("https://h/c.zip?X-Amz-Signature=s3cret", "X-Amz-Signature"),
    ("https://h/c.zip?access_token=s3cret", "access_token"),
])
def test_a_source_with_a_secret_is_refused_naming_what_but_not_the_secret(tmp_path, uri, what):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(shipped_params({"data": {"corpus": "custom", "source": uri}})))
    with pytest.raises(UserError) as err:
        load_params(path)
    message = str(err.value)
    assert "data.source" in message and what in message
    assert "s3cret" not in message
    assert "~/.netrc" in message and "RNNLAB_DOWNLOAD_TOKEN" in message


@pytest.mark.parametrize("uri", ["https://h/c.zip", "file:///data/c.zip", "/data/c.zip",
                                 "https://h/c.zip?version=2", "ssh://git@github.com/lab/repo.git",
                                 "postgresql+psycopg://optuna@db:5432/optuna"])
def test_a_source_without_a_secret_carries_none(uri):
    assert credentials_in(uri) == []
