"""Fetch a corpus, check it, and lay it out for the tokenize stage (`prepare_raw`).

Where the text comes from (`data` is params.yaml's `data` section):
    built-in corpus   data.source if set, else the copy bundled in rnnlab/corpora, else its URL;
                      its sha1 in `BUILTIN` is always checked, the bundled copy's too.
    corpus: custom    data.source: a text file, a folder or zip with train/val/test files, or a
                      URL to a file or zip; data.sha1 is checked when set.

Nothing is cached: a download goes to a temporary sibling folder of out_dir, deleted when the
stage ends (DVC's cache keeps out_dir, so the network is used only when the stage reruns).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from rnnlab.config import Data
from rnnlab.corpora import BUILTIN
from rnnlab.data.fetch import fetch, local_path
from rnnlab.errors import UserError
from rnnlab.fileio import write_json, write_text
from rnnlab.redact import public_uri

# Split file names a folder or zip may use; the first name of each is what out_dir gets.
SPLIT_NAMES = {
    "train.txt": ("train.txt",),
    "val.txt": ("val.txt", "valid.txt", "validation.txt"),
    "test.txt": ("test.txt",),
}
EXPECTED_SPLITS = "train.txt, val.txt (or valid.txt / validation.txt) and test.txt"
OUTPUT_NAMES = {"corpus.txt", *SPLIT_NAMES, "source.json"}  # all this stage ever writes


def prepare_raw(data: Data, out_dir: str | os.PathLike) -> dict:
    """Fetch and check the corpus `data` names and write out_dir: exactly one of

        out_dir/corpus.txt                      one text; tokenize cuts it by `tokenize.split`
        out_dir/train.txt, val.txt, test.txt    a corpus that comes with its own splits

    plus out_dir/source.json, which it also returns: {"corpus": name, "source": URL or path
    read, "sha1": of the fetched file (null for a folder), "member": zip member, {split file:
    member} or null, "splits": true/false, "chars": characters in all texts}. out_dir is built
    in a sibling folder and renamed into place, so a failure leaves neither a half-made out_dir
    nor stray folders, and an old out_dir is replaced only by a complete new one."""
    out_dir = Path(os.path.abspath(out_dir))  # a name and a parent even for `.` or `raw/`
    _check_replaceable(out_dir)
    source, sha1, member = resolve_source(data)
    _make_parent(out_dir)
    with tempfile.TemporaryDirectory(
        prefix=f".{out_dir.name}.", suffix=".download", dir=out_dir.parent
    ) as tmp:
        texts, actual = read_texts(source, sha1, member, Path(tmp), custom=data.corpus == "custom")
    info = {
        "corpus": data.corpus,
        "source": public_uri(source),
        "sha1": actual,
        "member": member,
        "splits": "corpus.txt" not in texts,
        "chars": sum(len(t) for t in texts.values()),
    }
    _publish(texts, info, out_dir)
    return info


def resolve_source(data: Data) -> tuple[str, str | None, str | dict[str, str] | None]:
    """What to read for `data`: (URL or path, sha1 to check or None, zip member(s) or None)."""
    if data.corpus == "custom":
        return data.source, data.sha1, None
    corpus = BUILTIN[data.corpus]
    if data.sha1 is not None and data.sha1 != corpus.sha1:
        raise UserError(
            f"data.sha1 = {data.sha1!r}: corpus {corpus.name!r} is always checked against its "
            f"own sha1 {corpus.sha1}; data.sha1 is for corpus: custom, so set it to null"
        )
    if data.source:
        return data.source, corpus.sha1, corpus.member
    bundled = corpus.bundled_path()
    return (_shown(bundled) if bundled else corpus.url), corpus.sha1, corpus.member


def _shown(path: Path) -> str:
    """`path` relative to the working directory when inside it: source.json (a DVC output)
    then reads the same in every checkout."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_texts(
    source: str, sha1: str | None, member: str | dict[str, str] | None, tmp: Path, custom: bool
) -> tuple[dict[str, str], str | None]:
    """The texts of `source` by output file name, and the sha1 of the file read (None for a
    folder). Downloads land in `tmp`."""
    local = local_path(source)
    shown = public_uri(source)  # what the messages below quote
    if custom and local is not None and local.is_dir():
        if sha1 is not None:
            raise UserError(
                f"data.sha1 is set but data.source = {shown!r} is a folder, which has no single "
                "sha1; set data.sha1 to null, or zip the folder and point data.source at the zip"
            )
        return _folder_splits(local, shown), None
    fetched = tmp / "fetched"
    actual = fetch(source, fetched, sha1)
    if isinstance(member, dict):  # a built-in corpus with its own splits
        return {out: _zip_member(fetched, name, shown) for out, name in member.items()}, actual
    if member is not None:
        return {"corpus.txt": _zip_member(fetched, member, shown)}, actual
    if zipfile.is_zipfile(fetched):
        return _zip_splits(fetched, shown), actual
    return {"corpus.txt": decode(fetched.read_bytes(), shown)}, actual


def decode(raw: bytes, where: str) -> str:
    """Strict UTF-8 without a BOM; an undecodable or blank text is a UserError."""
    try:
        text = raw.decode("utf-8-sig")  # -sig: drop a leading BOM, which is not text
    except UnicodeDecodeError as err:
        raise UserError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start:,}); "
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.txt > out.txt)"
        ) from None
    if not text.strip():
        raise UserError(f"{where}: empty (no text besides whitespace)")
    return text


def _folder_splits(folder: Path, source: str) -> dict[str, str]:
    try:
        found = {p.name: p for p in folder.iterdir() if p.is_file()}
        picked = _pick_splits(found, source)
        return {out: decode(found[name].read_bytes(), str(found[name])) for out, name in picked.items()}
    except OSError as err:  # e.g. a split file or the folder without read permission
        raise UserError(
            f"{err.filename or source}: cannot read it: {err.strerror or err} (check data.source "
            "and the file's permissions)"
        ) from None


def _zip_splits(path: Path, source: str) -> dict[str, str]:
    with _open_zip(path, source) as zf:
        files = [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
        # `zip -r corpus.zip corpus/` puts every file under one folder: look inside it
        tops = {n.split("/", 1)[0] for n in files}
        prefix = f"{next(iter(tops))}/" if len(tops) == 1 and all("/" in n for n in files) else ""
        found = {n.removeprefix(prefix): n for n in files}
        picked = _pick_splits(found, source)
        return {
            out: decode(_read_member(zf, found[name], source), f"{source}:{found[name]}")
            for out, name in picked.items()
        }


def _pick_splits(found: dict, source: str) -> dict[str, str]:
    """Output name -> the name in `found` that holds that split."""
    picked, missing = {}, []
    for out, names in SPLIT_NAMES.items():
        present = [n for n in names if n in found]
        if len(present) > 1:
            raise UserError(
                f"data.source = {source!r}: both {' and '.join(present)} present; keep one"
            )
        if present:
            picked[out] = present[0]
        else:
            missing.append(out)
    if missing:
        listing = ", ".join(sorted(found)[:10]) or "nothing"
        raise UserError(
            f"data.source = {source!r}: no {', '.join(missing)}; a folder or zip corpus needs "
            f"{EXPECTED_SPLITS} (found: {listing}); for one text, point data.source at the file"
        )
    return picked


def _zip_member(path: Path, member: str, source: str) -> str:
    with _open_zip(path, source) as zf:
        if member not in zf.namelist():
            listing = ", ".join(zf.namelist()[:10]) or "nothing"
            raise UserError(f"{source}: no member {member!r} in the zip (it holds: {listing})")
        return decode(_read_member(zf, member, source), f"{source}:{member}")


def _open_zip(path: Path, source: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise UserError(f"{source}: not a readable zip file ({err})") from None


def _read_member(zf: zipfile.ZipFile, name: str, source: str) -> bytes:
    try:
        return zf.read(name)
    except zipfile.BadZipFile as err:  # e.g. a bad CRC: the zip is corrupt
        raise UserError(f"{source}:{name}: corrupt zip member ({err})") from None


# ---------------------------------------------------------------------------------------------
# writing out_dir in one step


def _check_replaceable(out_dir: Path) -> None:
    """Refuse an out_dir holding anything this stage did not write: replacing it would delete
    that (think `--out data` instead of `--out data/raw`)."""
    if not os.path.lexists(out_dir):
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; remove it or choose another path")
    others = sorted(set(os.listdir(out_dir)) - OUTPUT_NAMES)
    if others:
        raise UserError(
            f"{out_dir}: holds files the download stage did not write ({', '.join(others[:5])}); "
            "refusing to replace it: choose another output folder or empty this one"
        )


def _make_parent(out_dir: Path) -> None:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EEXIST):
            raise UserError(f"cannot create {out_dir.parent}: {err.strerror}") from None
        raise


def _publish(texts: dict[str, str], info: dict, out_dir: Path) -> None:
    """Write the texts and source.json into a sibling folder, then rename it to out_dir."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".new", dir=out_dir.parent))
    try:
        for name, text in texts.items():
            write_text(staging / name, text)
        write_json(staging / "source.json", info)
        _swap(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _swap(new: Path, out_dir: Path) -> None:
    """Rename `new` to `out_dir`. An old out_dir is moved aside first (POSIX cannot rename a
    folder onto a non-empty one) and deleted only once the new one is in place."""
    # _check_replaceable made sure an existing out_dir is a folder of our own outputs
    if not os.path.lexists(out_dir):
        os.rename(new, out_dir)
        return
    old = new.with_name(new.name + ".old")  # `new` is unique, so this name is free
    os.rename(out_dir, old)
    try:
        os.rename(new, out_dir)
    except OSError:
        os.rename(old, out_dir)  # put the old output back
        raise
    shutil.rmtree(old)
