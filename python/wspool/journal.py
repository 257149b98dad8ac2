"""Durable jobs: read and retry what ``consume(..., journal=path)`` wrote.

Every message a journaled stream receives is written to an SQLite file with its job id before a
worker sees it; its status then moves ``received`` -> ``running`` -> ``done`` | ``failed``.
:class:`Journal` opens such a file (also while a consumer writes to it) and returns
:class:`JobRecord` objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Optional, Union

from . import _native

__all__ = ["STATUSES", "JobRecord", "Journal"]

#: The statuses a job goes through, in order (``done`` and ``failed`` are final).
STATUSES = ("received", "running", "done", "failed")


@dataclass(frozen=True)
class JobRecord:
    """One job of a journal.

    Attributes:
        id: the job id (``Job.id``); ids keep increasing across restarts on one journal.
        status: ``"received"`` (written, not started), ``"running"`` (a worker started it),
            ``"done"`` (the handler returned) or ``"failed"`` (it raised after its retries, the
            payload did not decode, or wspool failed).
        connection: the connection number that delivered it (of the run that received it).
        type: ``"text"`` or ``"binary"``.
        received_at: ``time.time()`` at receipt.
        payload: the message as received.
        attempts: how many times a worker started it; more than 1 means it ran again after a
            restart (at-least-once).
        started_at: ``time.time()`` when the last attempt started, or None.
        finished_at: ``time.time()`` when it was done or failed, or None.
        value: the handler's return value read back from JSON, or its ``repr()`` (a str) when it
            was not JSON-serialisable (see ``value_format``); None without a handler, where the
            value is the payload itself.
        value_format: ``"json"``, ``"repr"`` or None (no value stored).
        error_type: the exception's class name when it failed (e.g. ``"ValueError"``).
        error_message: ``str()`` of that exception.
    """

    id: int
    status: str
    connection: int
    type: str
    received_at: float
    payload: bytes
    attempts: int
    started_at: Optional[float]
    finished_at: Optional[float]
    value: Any
    value_format: Optional[str]
    error_type: Optional[str]
    error_message: Optional[str]

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (invalid bytes replaced)."""
        return self.payload.decode("utf-8", "replace")

    def as_dict(self) -> dict[str, Any]:
        """The record as a JSON-friendly dict (the payload as text)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["payload"] = self.text
        return out

    @classmethod
    def _from_native(cls, row: dict[str, Any]) -> JobRecord:
        value = row["value"]
        if row["value_format"] == "json" and value is not None:
            value = json.loads(value)
        return cls(**{**row, "value": value})


class Journal:
    """An existing journal file, opened to read its jobs and put failed ones back.

    ``Journal(path)`` raises :class:`wspool.JournalError` if the file is missing, is not a
    wspool journal, or was written by a newer wspool. Reading works while a consumer writes to
    the same file (SQLite WAL). Use it as a context manager, or call :meth:`close`.

    Example::

        with wspool.Journal("jobs.db") as journal:
            print(journal.counts())
            for record in journal.list(status="failed"):
                print(record.id, record.error_type, record.error_message)
                journal.retry(record.id)  # the next consumer on jobs.db runs it again
    """

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self._native = _native.Journal(os.fspath(path))

    @property
    def path(self) -> str:
        """The journal's path."""
        return self._native.path

    def get(self, job_id: int) -> Optional[JobRecord]:
        """The job ``job_id``, or None if the journal has no such job."""
        row = self._native.get(job_id)
        return None if row is None else JobRecord._from_native(row)

    def list(self, status: Optional[str] = None, limit: int = 100) -> list[JobRecord]:
        """The newest ``limit`` jobs, largest id first; only those of ``status`` if given
        (one of :data:`STATUSES`; anything else raises ValueError)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, not {limit!r}")
        return [JobRecord._from_native(row) for row in self._native.list(status, limit)]

    def retry(self, job_id: int) -> Optional[str]:
        """Puts job ``job_id`` back to ``"received"`` (its value and error cleared), so that the
        next consumer started on this journal runs it again, before any new message. Returns
        the status it had, or None if there is no such job. A consumer already running does not
        pick it up."""
        return self._native.retry(job_id)

    def counts(self) -> dict[str, int]:
        """Jobs per status (``received``, ``running``, ``done``, ``failed``), ``total``,
        ``rerun`` (jobs started more than once: duplicates of at-least-once recovery) and
        ``duplicates`` (runs beyond the first, summed)."""
        return self._native.counts()

    def close(self) -> None:
        """Closes the file; later calls raise JournalError."""
        self._native.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<wspool.Journal {self.path!r}>"
