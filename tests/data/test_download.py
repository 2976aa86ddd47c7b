"""The download stage: fetch over real HTTP (a local server), checksums, retries, corpus layouts.

Every file is written under tmp_path; the HTTP server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from rnnlab.config import Data
from rnnlab.corpora import BUILTIN
from rnnlab.data import download
from rnnlab.data.download import prepare_raw
from rnnlab.data.fetch import fetch
from rnnlab.errors import UserError
from tests.conftest import shipped, shipped_params
from tests.stagerun import in_process

REPO = Path(__file__).resolve().parents[2]
BODY = b"The Time Traveller (for so it will be convenient to speak of him)\n" * 40
BODY_SHA1 = hashlib.sha1(BODY).hexdigest()
LYRICS = "想要有直升机\n想要和你飞到宇宙去\n想要和你融化在一起\n融化在宇宙里\n"
FAST = dict(timeout=2.0, progress=False, backoff=0.0)  # no waiting between attempts in tests
TOKEN = "planted-download-token"
LOGINS = {"/token": f"Bearer {TOKEN}",   # path -> the Authorization header it wants
          "/basic": "Basic " + __import__("base64").b64encode(b"ann:planted-netrc-password").decode()}


# ---------------------------------------------------------------------------------------------
# a real HTTP server on 127.0.0.1


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", length: int | None = None):
    """Answer with `body`, announcing `length` bytes (a lie, when given)."""
    h.send_response(status)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    h.end_headers()
    h.wfile.write(body)


class Server:
    """Routes by path; `hits` counts the requests each path got, `files` serves plain bytes."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.logins: list[str | None] = []  # the Authorization header of each request
        self.files: dict[str, bytes] = {"/good": BODY}
        self.release = threading.Event()  # wakes the slow handlers at teardown
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                server.logins.append(self.headers.get("Authorization"))
                try:
                    server.route(self, server.hits[self.path])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow answer on purpose

            def log_message(self, *args):
                pass  # keep the test output clean

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def route(self, h: BaseHTTPRequestHandler, hit: int) -> None:
        if h.path in self.files:
            _send(h, 200, self.files[h.path])
        elif h.path == "/dropped":  # announce the whole body, send a tenth, hang up
            _send(h, 200, BODY[: len(BODY) // 10], length=len(BODY))
        elif h.path == "/slow":  # no answer until the client has timed out
            self.release.wait(5)
            _send(h, 200, BODY)
        elif h.path == "/stall":  # headers and a first piece, then silence
            h.send_response(200)
            h.send_header("Content-Length", str(len(BODY)))
            h.end_headers()
            h.wfile.write(BODY[:100])
            h.wfile.flush()
            self.release.wait(5)
            h.wfile.write(BODY[100:])
        elif h.path == "/flaky":  # a 500 first, then the file
            _send(h, 500) if hit == 1 else _send(h, 200, BODY)
        elif h.path == "/down":
            _send(h, 503)
        elif h.path in LOGINS:  # the file, for the right login only
            _send(h, 200, BODY) if h.headers.get("Authorization") == LOGINS[h.path] else _send(h, 401)
        elif h.path == "/elsewhere":  # a redirect to another host name of this machine
            h.send_response(302)
            h.send_header("Location", self.url.replace("127.0.0.1", "localhost") + "/good")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            _send(h, 404, b"not found")


@pytest.fixture
def server():
    s = Server()
    thread = threading.Thread(target=s.httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# fetch over HTTP


def test_fetch_writes_the_checked_file_and_no_temporary_one(server, tmp_path):
    dest = tmp_path / "out.txt"
    assert fetch(f"{server.url}/good", dest, BODY_SHA1, **FAST) == BODY_SHA1
    assert dest.read_bytes() == BODY
    assert server.hits["/good"] == 1
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary file left


def test_fetch_wrong_sha1_names_url_and_both_sums(server, tmp_path):
    dest = tmp_path / "out.txt"
    wrong = "0" * 40
    with pytest.raises(UserError) as err:
        fetch(f"{server.url}/good", dest, wrong, **FAST)
    msg = str(err.value)
    assert f"{server.url}/good" in msg and wrong in msg and BODY_SHA1 in msg
    assert "data.source" in msg
    assert os.listdir(tmp_path) == []


def test_fetch_404_is_not_retried(server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404") as err:
        fetch(f"{server.url}/nothing", tmp_path / "out.txt", retries=3, **FAST)
    assert f"{server.url}/nothing" in str(err.value)
    assert server.hits["/nothing"] == 1
    assert os.listdir(tmp_path) == []


def test_fetch_dropped_connection_is_retried_then_fails(server, tmp_path):
    with pytest.raises(UserError) as err:
        fetch(f"{server.url}/dropped", tmp_path / "out.txt", retries=2, **FAST)
    msg = str(err.value)
    assert f"connection dropped after {len(BODY) // 10:,} of {len(BODY):,} bytes" in msg
    assert "3 attempts" in msg and f"{server.url}/dropped" in msg
    assert server.hits["/dropped"] == 3
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", ["/slow", "/stall"])
def test_fetch_retries_a_timeout_then_names_it(server, tmp_path, path):
    with pytest.raises(UserError, match=r"timed out after 0\.3 s") as err:
        fetch(f"{server.url}{path}", tmp_path / "out.txt", retries=1, timeout=0.3,
              progress=False, backoff=0.0)
    assert "2 attempts" in str(err.value)
    assert server.hits[path] == 2
    assert os.listdir(tmp_path) == []


def test_fetch_retries_a_500_until_it_succeeds(server, tmp_path):
    dest = tmp_path / "out.txt"
    assert fetch(f"{server.url}/flaky", dest, BODY_SHA1, retries=1, **FAST) == BODY_SHA1
    assert dest.read_bytes() == BODY
    assert server.hits["/flaky"] == 2


def test_fetch_5xx_gives_up_after_retries(server, tmp_path):
    with pytest.raises(UserError, match=r"HTTP 503 .*\(3 attempts\)"):
        fetch(f"{server.url}/down", tmp_path / "out.txt", retries=2, **FAST)
    assert server.hits["/down"] == 3


def test_a_refused_connection_is_one_error_that_says_check_the_network(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="connection failed.*check the network"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "out.txt", retries=0, **FAST)
    assert os.listdir(tmp_path) == []


def test_fetch_failure_keeps_an_old_file(server, tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(UserError):
        fetch(f"{server.url}/good", dest, "0" * 40, **FAST)
    assert dest.read_text() == "old"


# ---------------------------------------------------------------------------------------------
# fetch from file:// and local paths


@pytest.mark.parametrize("as_uri", [False, True])
def test_fetch_copies_a_local_path_or_file_uri(tmp_path, as_uri):
    src = tmp_path / "src.txt"
    src.write_bytes(BODY)
    dest = tmp_path / "out" / "copy.txt"
    assert fetch(src.as_uri() if as_uri else str(src), dest, BODY_SHA1) == BODY_SHA1
    assert dest.read_bytes() == BODY


def test_a_missing_local_file_is_one_error_leaving_nothing(tmp_path):
    with pytest.raises(UserError, match="nope.txt: file not found"):
        fetch(str(tmp_path / "nope.txt"), tmp_path / "out.txt")
    assert os.listdir(tmp_path) == []


def test_an_unknown_url_scheme_is_refused(tmp_path):
    with pytest.raises(UserError, match="unsupported URL scheme 'ftp'"):
        fetch("ftp://example.com/x.txt", tmp_path / "out.txt")


# ---------------------------------------------------------------------------------------------
# prepare_raw: built-in corpora


# ---------------------------------------------------------------------------------------------
# a server that wants a login: RNNLAB_DOWNLOAD_TOKEN or ~/.netrc, never the URL


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """No token, and a ~/.netrc of no one (requests reads the user's own otherwise); the token,
    once set, may go to the test server's host."""
    monkeypatch.delenv("RNNLAB_DOWNLOAD_TOKEN", raising=False)
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN_HOSTS", "127.0.0.1")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_fetch_sends_the_token_as_a_bearer_login(server, tmp_path, monkeypatch, no_login):
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN", TOKEN)
    assert fetch(server.url + "/token", tmp_path / "f", BODY_SHA1, **FAST) == BODY_SHA1
    assert server.logins == [f"Bearer {TOKEN}"]


@pytest.mark.parametrize("hosts", ["", "data.lab.example", "127.0.0.1:1"])
def test_the_token_goes_only_to_the_hosts_named_for_it(server, tmp_path, monkeypatch, no_login,
                                                       hosts):
    """Unset, another host, or this host on another port: the request goes without the token,
    and the refusal says why."""
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN", TOKEN)
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN_HOSTS", hosts)
    with pytest.raises(UserError, match="RNNLAB_DOWNLOAD_TOKEN is not sent to 127.0.0.1: it is "
                                        "not in RNNLAB_DOWNLOAD_TOKEN_HOSTS"):
        fetch(server.url + "/token", tmp_path / "f", **FAST)
    assert server.logins == [None]
    port = server.url.rsplit(':', 1)[1]
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN_HOSTS", f"data.lab.example, 127.0.0.1:{port}")
    assert fetch(server.url + "/token", tmp_path / "f", BODY_SHA1, **FAST) == BODY_SHA1
    assert server.logins[-1] == f"Bearer {TOKEN}"


def test_fetch_reads_the_login_from_netrc(server, tmp_path, monkeypatch, no_login):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login ann password planted-netrc-password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert fetch(server.url + "/basic", tmp_path / "f", BODY_SHA1, **FAST) == BODY_SHA1


@pytest.mark.parametrize("token, said", [(None, "no login was sent"),
                                         ("wrong", "the token in RNNLAB_DOWNLOAD_TOKEN was refused")])
def test_fetch_refused_a_login_says_where_the_login_goes(server, tmp_path, monkeypatch, no_login,
                                                         token, said):
    if token:
        monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN", token)
    with pytest.raises(UserError) as err:
        fetch(server.url + "/token", tmp_path / "f", **FAST)
    message = str(err.value)
    assert "HTTP 401" in message and said in message
    assert "~/.netrc" in message and "RNNLAB_DOWNLOAD_TOKEN" in message
    assert server.hits["/token"] == 1  # a refusal is not retried
    assert not (tmp_path / "f").exists()


def test_the_token_does_not_follow_a_redirect_to_another_host(server, tmp_path, monkeypatch,
                                                              no_login):
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN", TOKEN)
    assert fetch(server.url + "/elsewhere", tmp_path / "f", BODY_SHA1, **FAST) == BODY_SHA1
    assert server.logins == [f"Bearer {TOKEN}", None]  # 127.0.0.1 got it, localhost did not


def test_the_token_never_goes_in_clear_text_to_another_machine(tmp_path, monkeypatch):
    """Even to a host named for it."""
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN", TOKEN)
    monkeypatch.setenv("RNNLAB_DOWNLOAD_TOKEN_HOSTS", "corpora.example.org")
    with pytest.raises(UserError, match="plain http to another machine") as err:
        fetch("http://corpora.example.org/c.txt", tmp_path / "f", **FAST)
    assert TOKEN not in str(err.value)


def test_stage_refuses_a_source_with_a_secret_in_one_line_without_it(tmp_path):
    url = "https://ann:planted-url-password@corpora.example.org/c.zip"
    run = _stage(tmp_path, {"corpus": "custom", "source": url}, tmp_path / "raw")
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")
    assert "planted-url-password" not in run.stdout + run.stderr
    assert "https://ann:***@corpora.example.org/c.zip" in run.stderr and "~/.netrc" in run.stderr
    assert not (tmp_path / "raw").exists()


def _replace_builtin(monkeypatch, name: str, **changes) -> None:
    monkeypatch.setitem(BUILTIN, name, dataclasses.replace(BUILTIN[name], **changes))


def _lyrics_zip(path: Path, member: str = "jaychou_lyrics.txt") -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, LYRICS.encode("utf-8"))
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _source_json(out: Path) -> dict:
    return json.loads((out / "source.json").read_text(encoding="utf-8"))


def test_the_bundled_timemachine_is_copied_with_its_record(tmp_path):
    out = tmp_path / "raw"
    info = prepare_raw(shipped(Data), out)
    bundled = BUILTIN["timemachine"].bundled_path()
    assert (out / "corpus.txt").read_bytes() == bundled.read_bytes()
    assert sorted(os.listdir(out)) == ["corpus.txt", "source.json"]
    assert _source_json(out) == info
    assert info["sha1"] == BUILTIN["timemachine"].sha1
    assert info["member"] is None and info["splits"] is False
    assert info["chars"] == len(bundled.read_text(encoding="utf-8"))
    assert os.listdir(tmp_path) == ["raw"]


def test_bundled_copy_is_checked(tmp_path, monkeypatch):
    _replace_builtin(monkeypatch, "timemachine", sha1="0" * 40)
    with pytest.raises(UserError, match="sha1 mismatch: expected 0{40}, got 090b5e7e"):
        prepare_raw(shipped(Data), tmp_path / "raw")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("as_uri", [False, True])
def test_a_local_copy_of_a_builtin_corpus_is_taken_when_its_sha1_fits(tmp_path, as_uri):
    copy = tmp_path / "tm.txt"
    copy.write_bytes(BUILTIN["timemachine"].bundled_path().read_bytes())
    source = copy.as_uri() if as_uri else str(copy)
    info = prepare_raw(shipped(Data, source=source), tmp_path / "raw")
    assert info["source"] == source and info["sha1"] == BUILTIN["timemachine"].sha1
    assert (tmp_path / "raw" / "corpus.txt").read_bytes() == copy.read_bytes()


def test_a_local_copy_of_another_sha1_is_refused_naming_data_source(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("not the time machine\n")
    with pytest.raises(UserError, match="other.txt: sha1 mismatch.*data.source"):
        prepare_raw(shipped(Data, source=str(other)), tmp_path / "raw")


def test_builtin_rejects_a_different_data_sha1(tmp_path):
    with pytest.raises(UserError, match="data.sha1 = '1{40}'.*corpus: custom"):
        prepare_raw(shipped(Data, sha1="1" * 40), tmp_path / "raw")


def test_a_builtin_zip_gives_its_member_as_the_corpus(tmp_path, monkeypatch):
    zpath = tmp_path / "lyrics.zip"
    _replace_builtin(monkeypatch, "jaychou_lyrics", sha1=_lyrics_zip(zpath))
    out = tmp_path / "raw"
    info = prepare_raw(shipped(Data, corpus="jaychou_lyrics", source=str(zpath)), out)
    assert (out / "corpus.txt").read_text(encoding="utf-8") == LYRICS
    assert info["member"] == "jaychou_lyrics.txt" and info["chars"] == len(LYRICS)


def test_a_builtin_zip_over_http_gives_its_member(server, tmp_path, monkeypatch):
    zpath = tmp_path / "lyrics.zip"
    _replace_builtin(monkeypatch, "jaychou_lyrics", sha1=_lyrics_zip(zpath))
    server.files["/lyrics.zip"] = zpath.read_bytes()
    info = prepare_raw(shipped(Data, corpus="jaychou_lyrics", source=f"{server.url}/lyrics.zip"),
                       tmp_path / "raw")
    assert info["source"] == f"{server.url}/lyrics.zip"
    assert (tmp_path / "raw" / "corpus.txt").read_text(encoding="utf-8") == LYRICS


def test_a_builtin_zip_without_its_member_names_what_it_holds(tmp_path, monkeypatch):
    zpath = tmp_path / "lyrics.zip"
    _replace_builtin(monkeypatch, "jaychou_lyrics", sha1=_lyrics_zip(zpath, member="other.txt"))
    with pytest.raises(UserError, match="no member 'jaychou_lyrics.txt'.*other.txt"):
        prepare_raw(shipped(Data, corpus="jaychou_lyrics", source=str(zpath)), tmp_path / "raw")


# Penn Treebank, laid out as d2l's ptb.zip: a folder ptb/ with the three split files
PTB_FILES = {
    "ptb/ptb.train.txt": " the cat sat \n the <unk> sat on the mat \n",
    "ptb/ptb.valid.txt": " the dog \n",
    "ptb/ptb.test.txt": " a mat \n",
}
PTB_OUT = {"train.txt": PTB_FILES["ptb/ptb.train.txt"], "val.txt": PTB_FILES["ptb/ptb.valid.txt"],
           "test.txt": PTB_FILES["ptb/ptb.test.txt"]}


def _ptb_zip(path: Path, files: dict[str, str] = PTB_FILES) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ptb/", b"")  # the folder's own entry, as `zip -r` writes it
        for name, text in files.items():
            zf.writestr(name, text.encode("utf-8"))
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _check_ptb_out(out: Path, info: dict) -> None:
    assert sorted(os.listdir(out)) == ["source.json", "test.txt", "train.txt", "val.txt"]
    for name, text in PTB_OUT.items():
        assert (out / name).read_text(encoding="utf-8") == text
    assert info["splits"] is True and info["corpus"] == "ptb"
    assert info["member"] == BUILTIN["ptb"].member == {
        "train.txt": "ptb/ptb.train.txt", "val.txt": "ptb/ptb.valid.txt", "test.txt": "ptb/ptb.test.txt"}
    assert info["chars"] == sum(len(t) for t in PTB_FILES.values())
    assert _source_json(out) == info  # the dict member survives the JSON round trip


@pytest.mark.parametrize("as_uri", [False, True])
def test_builtin_ptb_from_a_local_zip(tmp_path, monkeypatch, as_uri):
    zpath = tmp_path / "ptb.zip"
    sha1 = _ptb_zip(zpath)
    _replace_builtin(monkeypatch, "ptb", sha1=sha1)
    source = zpath.as_uri() if as_uri else str(zpath)
    out = tmp_path / "raw"
    info = prepare_raw(shipped(Data, corpus="ptb", source=source), out)
    _check_ptb_out(out, info)
    assert info["source"] == source and info["sha1"] == sha1
    assert sorted(os.listdir(tmp_path)) == ["ptb.zip", "raw"]  # no download folder left


def test_builtin_ptb_over_http(server, tmp_path, monkeypatch):
    zpath = tmp_path / "ptb.zip"
    _replace_builtin(monkeypatch, "ptb", sha1=_ptb_zip(zpath))
    server.files["/ptb.zip"] = zpath.read_bytes()
    url = f"{server.url}/ptb.zip"
    out = tmp_path / "raw"
    info = prepare_raw(shipped(Data, corpus="ptb", source=url), out)
    _check_ptb_out(out, info)
    assert info["source"] == url and server.hits["/ptb.zip"] == 1


def test_builtin_ptb_default_source_is_its_url(server, tmp_path, monkeypatch):
    """No data.source and nothing bundled: the corpus's own URL is fetched."""
    zpath = tmp_path / "ptb.zip"
    assert BUILTIN["ptb"].bundled is None  # not redistributable
    _replace_builtin(monkeypatch, "ptb", sha1=_ptb_zip(zpath), url=f"{server.url}/ptb.zip")
    server.files["/ptb.zip"] = zpath.read_bytes()
    info = prepare_raw(shipped(Data, corpus="ptb"), tmp_path / "raw")
    _check_ptb_out(tmp_path / "raw", info)
    assert info["source"] == f"{server.url}/ptb.zip"


def test_a_ptb_zip_of_another_sha1_is_refused_leaving_nothing(tmp_path, monkeypatch):
    zpath = tmp_path / "ptb.zip"
    actual = _ptb_zip(zpath)
    _replace_builtin(monkeypatch, "ptb", sha1="0" * 40)
    with pytest.raises(UserError, match=f"ptb.zip: sha1 mismatch: expected 0{{40}}, got {actual}"):
        prepare_raw(shipped(Data, corpus="ptb", source=str(zpath)), tmp_path / "raw")
    assert os.listdir(tmp_path) == ["ptb.zip"]


def test_a_ptb_zip_missing_a_split_names_what_it_holds(tmp_path, monkeypatch):
    zpath = tmp_path / "ptb.zip"
    files = {k: v for k, v in PTB_FILES.items() if k != "ptb/ptb.valid.txt"}
    _replace_builtin(monkeypatch, "ptb", sha1=_ptb_zip(zpath, files))
    with pytest.raises(UserError, match=r"no member 'ptb/ptb.valid.txt' in the zip.*ptb/ptb.train.txt"):
        prepare_raw(shipped(Data, corpus="ptb", source=str(zpath)), tmp_path / "raw")
    assert os.listdir(tmp_path) == ["ptb.zip"]


def test_stage_summary_names_the_zip_members(tmp_path, monkeypatch):
    from stages.download import summary

    zpath = tmp_path / "ptb.zip"
    sha1 = _ptb_zip(zpath)
    _replace_builtin(monkeypatch, "ptb", sha1=sha1)
    out = tmp_path / "raw"
    info = prepare_raw(shipped(Data, corpus="ptb", source=str(zpath)), out)
    chars = sum(len(t) for t in PTB_FILES.values())
    assert summary(info, out) == (
        f"ptb: {chars} characters from {zpath} (zip members ptb/ptb.train.txt, ptb/ptb.valid.txt, "
        f"ptb/ptb.test.txt, sha1 {sha1[:8]}…) -> {out / 'train.txt'}, {out / 'val.txt'}, "
        f"{out / 'test.txt'}"
    )


# ---------------------------------------------------------------------------------------------
# prepare_raw: custom corpora


def _custom(source: Path | str, sha1: str | None = None) -> Data:
    return shipped(Data, corpus="custom", source=str(source), sha1=sha1)


SPLITS = {"train.txt": "one two three\n", "valid.txt": "four five\n", "test.txt": "six seven\n"}


def test_a_custom_text_file_is_copied_without_its_bom(tmp_path):
    src = tmp_path / "my.txt"
    src.write_bytes("\ufeffhello wörld\n".encode("utf-8"))  # the BOM is dropped
    info = prepare_raw(_custom(src), tmp_path / "raw")
    assert (tmp_path / "raw" / "corpus.txt").read_text(encoding="utf-8") == "hello wörld\n"
    assert info["sha1"] == hashlib.sha1(src.read_bytes()).hexdigest()
    assert info["chars"] == len("hello wörld\n") and info["splits"] is False


def test_custom_sha1_is_checked(tmp_path):
    src = tmp_path / "my.txt"
    src.write_text("hello\n")
    with pytest.raises(UserError, match="expected 2{40}.*fix data.sha1"):
        prepare_raw(_custom(src, sha1="2" * 40), tmp_path / "raw")
    assert os.listdir(tmp_path) == ["my.txt"]


def test_a_custom_folder_of_splits_gives_train_val_and_test(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in SPLITS.items():
        (folder / name).write_text(text, encoding="utf-8")
    out = tmp_path / "raw"
    info = prepare_raw(_custom(folder), out)
    assert sorted(os.listdir(out)) == ["source.json", "test.txt", "train.txt", "val.txt"]
    assert (out / "val.txt").read_text() == SPLITS["valid.txt"]
    assert info["splits"] is True and info["sha1"] is None
    assert info["chars"] == sum(len(t) for t in SPLITS.values())


def test_a_custom_zip_of_splits_in_a_folder_gives_the_splits(tmp_path):
    zpath = tmp_path / "corpus.zip"
    with zipfile.ZipFile(zpath, "w") as zf:  # inside one folder, as `zip -r` makes it
        for name, text in SPLITS.items():
            zf.writestr(f"corpus/{name}", text)
    out = tmp_path / "raw"
    info = prepare_raw(_custom(zpath), out)
    assert (out / "train.txt").read_text() == SPLITS["train.txt"]
    assert (out / "test.txt").read_text() == SPLITS["test.txt"]
    assert info["splits"] is True and info["sha1"] == hashlib.sha1(zpath.read_bytes()).hexdigest()


def test_a_custom_folder_without_a_split_names_the_files_it_needs(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("a\n")
    (folder / "test.txt").write_text("b\n")
    with pytest.raises(UserError, match=r"no val\.txt; .*train\.txt, val\.txt \(or valid\.txt"):
        prepare_raw(_custom(folder), tmp_path / "raw")


def test_a_custom_folder_with_an_empty_split_names_it(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in {**SPLITS, "test.txt": " \n\n"}.items():
        (folder / name).write_text(text)
    with pytest.raises(UserError, match=r"test\.txt: empty"):
        prepare_raw(_custom(folder), tmp_path / "raw")


@pytest.mark.parametrize(
    "content, message",
    [
        ("caf\xe9\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
        (b"", "empty"),
        (b"  \n\t\n", "empty"),
    ],
    ids=["latin1", "empty", "whitespace"],
)
def test_custom_text_not_utf8_or_empty_is_refused_naming_the_file(tmp_path, content, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        prepare_raw(_custom(src), tmp_path / "raw")
    assert str(src) in str(err.value)
    assert os.listdir(tmp_path) == ["bad.txt"]


def test_a_missing_custom_source_is_one_error_leaving_nothing(tmp_path):
    with pytest.raises(UserError, match="nothing-here.txt: file not found"):
        prepare_raw(_custom(tmp_path / "nothing-here.txt"), tmp_path / "raw")
    assert os.listdir(tmp_path) == []


def test_custom_folder_with_sha1_is_an_error(tmp_path):
    with pytest.raises(UserError, match="is a folder, which has no single sha1"):
        prepare_raw(_custom(tmp_path, sha1="3" * 40), tmp_path / "raw")


# ---------------------------------------------------------------------------------------------
# prepare_raw: all or nothing


def _old_output(tmp_path: Path) -> Path:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "corpus.txt").write_text("old corpus")
    (out / "source.json").write_text("{}")
    return out


def test_failure_keeps_old_out_dir(tmp_path):
    out = _old_output(tmp_path)
    src = tmp_path / "empty.txt"
    src.write_text("")
    with pytest.raises(UserError):
        prepare_raw(_custom(src), out)
    assert (out / "corpus.txt").read_text() == "old corpus"
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "raw"]


def test_failure_while_writing_keeps_old_out_dir(tmp_path, monkeypatch):
    out = _old_output(tmp_path)

    def disk_full(path, obj):
        raise UserError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(download, "write_json", disk_full)
    with pytest.raises(UserError, match="No space left"):
        prepare_raw(shipped(Data), out)
    assert sorted(os.listdir(out)) == ["corpus.txt", "source.json"]
    assert (out / "corpus.txt").read_text() == "old corpus"
    assert os.listdir(tmp_path) == ["raw"]


def test_refuses_to_replace_a_folder_with_other_files(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"did not write \(notes\.md, raw\); refusing"):
        prepare_raw(shipped(Data), tmp_path)  # `--out data` instead of `--out data/raw`
    assert sorted(os.listdir(tmp_path)) == ["notes.md", "raw"]


def test_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "raw").write_text("a file")
    with pytest.raises(UserError, match="exists and is not a folder"):
        prepare_raw(shipped(Data), tmp_path / "raw")
    assert (tmp_path / "raw").read_text() == "a file"


def test_success_replaces_old_out_dir(tmp_path):
    out = _old_output(tmp_path)
    (out / "train.txt").write_text("stale split")
    prepare_raw(shipped(Data), out)
    assert sorted(os.listdir(out)) == ["corpus.txt", "source.json"]
    assert _source_json(out)["corpus"] == "timemachine"
    assert os.listdir(tmp_path) == ["raw"]


# ---------------------------------------------------------------------------------------------
# the stage script


def _stage(tmp_path: Path, data: dict, out: Path) -> subprocess.CompletedProcess:
    """stages.download on params.yaml with `data` changed, as DVC runs it (tests/stagerun.py)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(shipped_params({"data": data})))
    return in_process("download", "--params", path, "--out", out, cwd=REPO)


def test_stage_names_an_unknown_corpus_and_the_known_ones(tmp_path):
    run = _stage(tmp_path, {"corpus": "nope"}, tmp_path / "raw")
    assert run.returncode == 2
    assert run.stderr.startswith("error: ")
    assert "data.corpus = 'nope'" in run.stderr and "timemachine" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "raw").exists()


def test_stage_missing_source_is_one_line(tmp_path):
    missing = tmp_path / "missing.txt"
    run = _stage(tmp_path, {"corpus": "custom", "source": str(missing)}, tmp_path / "raw")
    assert run.returncode == 2
    assert run.stderr == f"error: {missing}: file not found (check data.source)\n"


def test_stage_prints_what_it_wrote_in_one_line(tmp_path):
    run = _stage(tmp_path, {}, tmp_path / "raw")
    assert run.returncode == 0, run.stderr
    assert run.stdout == (
        "timemachine: 178,979 characters from rnnlab/corpora/timemachine.txt "
        f"(sha1 090b5e7e…) -> {tmp_path / 'raw' / 'corpus.txt'}\n"
    )
