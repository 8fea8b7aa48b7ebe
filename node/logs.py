"""Logging set-up of the ``i3node`` processes, aware of the systemd journal.

Two formats:

* **Terminal / file** (no journal): ``2024-05-01 12:00:00,123 WARNING node.app: message``,
  one record per line; a traceback follows on its own lines.
* **Journal** (stderr is connected to journald, see :func:`stderr_is_journal`): every
  record is *one* line that starts with the syslog priority prefix of sd-daemon(3)
  (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug; ``<2>`` critical) and
  carries no timestamp of its own (journald stamps each entry)::

      <4>WARNING dicom.scp: TLS handshake with 10.0.0.7:40112 refused: no client certificate

  journald splits its stdout/stderr stream into entries at newlines, so a multi-line
  message or a traceback would become many entries, the later ones at the default
  priority and no longer attributable to the record. In the journal format every
  newline of the message and of the traceback is therefore written as the two
  characters ``\\n`` (a backslash is written as ``\\\\``, a carriage return as ``\\r``),
  so one record is one journal entry, at its priority, and a message cannot forge a
  second entry. To read a traceback::

      journalctl -u i3node -p err -o cat | sed 's/\\\\n/\\n/g'

systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a service whose stdout or stderr
goes to the journal; as systemd.exec(5) documents, a program checks that the pair
matches the file descriptor it writes to (a child process could inherit the variable
with another stderr), which :func:`stderr_is_journal` does.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any

__all__ = [
    "JournalFormatter",
    "PLAIN_FORMAT",
    "journal_priority",
    "setup_logging",
    "stderr_is_journal",
    "stream_is_journal",
]

log = logging.getLogger(__name__)

#: Format used when stderr is not the journal (unchanged from earlier releases).
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Format of the journal (the ``<N>`` prefix is added by :class:`JournalFormatter`).
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

#: Third-party loggers kept at WARNING.
NOISY_LOGGERS = ("pynetdicom", "apscheduler", "nnunetv2", "highdicom", "PIL", "matplotlib")


def journal_priority(levelno: int) -> int:
    """Return the syslog priority (sd-daemon(3)) of a :mod:`logging` level.

    Parameters
    ----------
    levelno : int
        A logging level (custom levels map to the next standard level below them).

    Returns
    -------
    int
        2 (crit) for CRITICAL, 3 (err) for ERROR, 4 (warning) for WARNING, 6 (info) for
        INFO and 7 (debug) below INFO.
    """
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class JournalFormatter(logging.Formatter):
    """Format records as single journal lines with an sd-daemon priority prefix.

    Parameters
    ----------
    fmt : str, optional
        Record format without time (default ``"%(levelname)s %(name)s: %(message)s"``).

    Notes
    -----
    Newlines (and carriage returns) in the message, the traceback and the stack info are
    written as ``\\n`` (``\\r``), backslashes as ``\\\\``: one record, one journal entry.
    """

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt or JOURNAL_FORMAT)

    def usesTime(self) -> bool:  # noqa: N802 (logging's API)
        """Never: journald timestamps each entry."""
        return False

    def format(self, record: logging.LogRecord) -> str:
        """Return ``<N>`` followed by the record, its traceback and stack on one line."""
        text = super().format(record)
        return f"<{journal_priority(record.levelno)}>{_one_line(text)}"


def stream_is_journal(stream: IO[Any] | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is the journal stream systemd announced in ``JOURNAL_STREAM``.

    Parameters
    ----------
    stream : file object or None
        The stream to check (it must have a file descriptor).
    environ : mapping, optional
        Environment to read ``JOURNAL_STREAM`` from (default :data:`os.environ`).

    Returns
    -------
    bool
        ``True`` when ``JOURNAL_STREAM`` is ``<device>:<inode>`` of `stream`'s file.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev_text, sep, ino_text = value.partition(":")
    if not sep or stream is None:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :data:`sys.stderr` goes to the systemd journal (see :func:`stream_is_journal`)."""
    return stream_is_journal(sys.stderr, environ)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """:data:`threading.excepthook` of the journal format: the traceback as one entry."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    log.critical("unhandled exception in thread %s", name, exc_info=exc_info)  # type: ignore[arg-type]


def setup_logging(level: str | int = "INFO", stream: IO[Any] | None = None) -> logging.Handler:
    """Send the root logger to `stream` (stderr) in the terminal or the journal format.

    Replaces the root logger's handlers; third-party loggers (:data:`NOISY_LOGGERS`) are kept
    at WARNING. In the journal format an exception escaping a thread is logged (one entry,
    priority crit) instead of printed over several lines.

    Parameters
    ----------
    level : str or int, default "INFO"
        Level of the root logger (a name such as ``"DEBUG"`` or a number).
    stream : file object, optional
        Where to write (default :data:`sys.stderr`, looked up at call time).

    Returns
    -------
    logging.Handler
        The installed handler.
    """
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    if stream_is_journal(out):
        handler.setFormatter(JournalFormatter())
        threading.excepthook = _log_thread_exception
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
