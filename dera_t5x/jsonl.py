"""JSON-lines files: one reader of records, and the resumable output of batch jobs.

Everything written here is strict JSON (`allow_nan=False`): a NaN or an
infinity is an error naming the record, never a bare `NaN` in the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging


def _error(path: str, what: str) -> ValueError:
    return ValueError(f"{path}: {what}. Fix: give a JSON-lines file with one object per "
                      "line holding the fields as strings.")


def parse_line(path: str, number: int, line: str, fields: Sequence[str]) -> dict[str, Any]:
    """One JSON object with string `fields`; errors name the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _error(path, f"line {number} is not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise _error(path, f"line {number} is not a JSON object")
    for field in fields:
        if not isinstance(record.get(field), str):
            raise _error(path, f"line {number} has no string field {field!r} "
                               f"(fields: {sorted(record)})")
    return record


def _check_exists(path: str, kind: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind.capitalize()} file not found: {path}. Fix: pass the "
                                "path of an existing JSON-lines file.")


def read_records(path: str, fields: Sequence[str], kind: str = "data"
                 ) -> tuple[dict[str, Any], ...]:
    """All records of a JSON-lines file (blank lines skipped), each with string `fields`.

    Args:
      kind: what the file is ('data', 'input'), for the messages.

    Raises:
      FileNotFoundError: no such file. ValueError: an empty file, a line that
        is not a JSON object or lacks a field (file and line named).
    """
    _check_exists(path, kind)
    with open(path, encoding="utf-8") as f:
        records = tuple(parse_line(path, number, line, fields)
                        for number, line in enumerate(f, start=1) if line.strip())
    if not records:
        raise _error(path, f"the file is empty (no {kind} records)")
    return records


def check_first_record(path: str, fields: Sequence[str], kind: str = "data") -> None:
    """Checks that `path` exists and its first record has `fields` (cheap)."""
    _check_exists(path, kind)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                parse_line(path, number, line, fields)
                return
    raise _error(path, f"the file is empty (no {kind} records)")


def dumps(record: dict[str, Any]) -> str:
    """One strict-JSON line (no NaN / Infinity; UTF-8 text kept)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


class ResumableOutput:
    """An append-only JSON-lines output: a header line, then records written in
    whole batches, resumable after a kill.

    The file is `{"header": {...}}` and then `records_per_batch` lines per
    batch, in order; line n (after the header) must have the `index` and
    `lambda` that `expected(n)` gives. A restarted job checks the header
    against its own (a mismatch is an error: nothing is overwritten), drops a
    trailing partial line and the lines of an unfinished batch, and appends.
    """

    def __init__(self, path: str, header: dict[str, Any], lambdas: Sequence[float],
                 batch_size: int, num_inputs: int):
        """Args: the output path, the job's header, and the (input, lambda)
        grid the records walk, input-major, in batches of `batch_size` inputs."""
        self.path = path
        self.header = json.loads(json.dumps(header))  # as it reads back from the file
        self.lambdas = list(lambdas)
        self.batch_size = batch_size
        self.num_inputs = num_inputs

    def _foreign(self, what: str) -> ValueError:
        return ValueError(f"{self.path} {what}. Nothing was written. Fix: pass a new "
                          "--output_file, or delete this file to start over.")

    def completed_inputs(self) -> tuple[int, int]:
        """Checks an existing file against this job, without changing it.

        Returns:
          (inputs done, byte offset where they end); (0, -1) if there is no
          file yet (or it is empty).
        """
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return 0, -1
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        complete = lines[:-1]  # the last piece is empty or a partial line
        try:
            header = json.loads(complete[0])["header"] if complete else None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            header = None
        if not isinstance(header, dict):
            raise self._foreign("exists but is not the output of a decode job (no header line)")
        differing = sorted(k for k in set(header) | set(self.header)
                           if header.get(k) != self.header.get(k))
        if differing:
            details = "; ".join(f"{k}: {header.get(k)!r} in the file, {self.header.get(k)!r} now"
                                for k in differing)
            raise self._foreign(f"holds the output of a job with other settings ({details})")
        records = complete[1:]
        k = len(self.lambdas)
        if len(records) > self.num_inputs * k:
            raise self._foreign(f"has {len(records)} lines, more than this job writes "
                                f"({self.num_inputs} x {k})")
        for n, line in enumerate(records):
            try:
                record = json.loads(line)
                ok = (record["index"] == n // k and record["lambda"] == self.lambdas[n % k])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise self._foreign(f"line {n + 2} is not the expected line of this job "
                                    f"(input {n // k}, lambda {self.lambdas[n % k]})")
        if len(records) == self.num_inputs * k:
            done = self.num_inputs
        else:  # Only whole batches count: batch i's samples depend on its rows and i.
            done = len(records) // (k * self.batch_size) * self.batch_size
        offset = sum(len(line) + 1 for line in complete[:1 + done * k])
        return done, offset

    def open(self, offset: int):
        """Opens for appending after `offset` (writing the header if -1)."""
        if offset < 0:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            f = open(self.path, "w", encoding="utf-8")
            self.write(f, [dumps({"header": self.header})])
            return f
        if offset < os.path.getsize(self.path):
            logging.info("Dropping %d bytes of an unfinished batch from %s.",
                         os.path.getsize(self.path) - offset, self.path)
            os.truncate(self.path, offset)
        return open(self.path, "a", encoding="utf-8")

    @staticmethod
    def write(f, lines: Sequence[str]) -> None:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
