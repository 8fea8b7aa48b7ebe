"""The journald-aware log format (:mod:`node.logs`)."""
from __future__ import annotations

import io
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from node.logs import (
    PLAIN_FORMAT,
    JournalFormatter,
    journal_priority,
    setup_logging,
    stream_is_journal,
)


def _record(level: int, msg: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("node.test", level, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("level", "prefix"),
    [(logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"), (logging.WARNING, "<4>"), (logging.INFO, "<6>"),
     (logging.DEBUG, "<7>"), (logging.INFO + 5, "<6>"), (5, "<7>")],
)
def test_priority_prefix_per_level(level: int, prefix: str) -> None:
    line = JournalFormatter().format(_record(level, "job %d done", 7))
    assert line.startswith(prefix)
    assert line.endswith("node.test: job 7 done")
    assert journal_priority(level) == int(prefix[1])


def test_journal_line_has_no_timestamp() -> None:
    line = JournalFormatter().format(_record(logging.WARNING, "disk low"))
    assert line == "<4>WARNING node.test: disk low"
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}", line)
    plain = logging.Formatter(PLAIN_FORMAT).format(_record(logging.WARNING, "disk low"))
    assert re.match(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} WARNING node.test: disk low$", plain)


def test_traceback_stays_one_line() -> None:
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError:
        rec = _record(logging.ERROR, "job %d failed", 3, exc_info=sys.exc_info())
    line = JournalFormatter().format(rec)
    assert "\n" not in line and "\r" not in line
    assert line.startswith("<3>ERROR node.test: job 3 failed\\nTraceback (most recent call last):\\n")
    assert "ValueError: bad value\\nsecond line" in line
    # The encoding is reversible: unescaping gives the plain message and traceback.
    decoded = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}[m[1]], line[3:])
    assert decoded.splitlines()[1] == "Traceback (most recent call last):"


def test_message_cannot_forge_a_second_entry() -> None:
    line = JournalFormatter().format(_record(logging.INFO, "AE %s", "X\n<3>ERROR fake\r\\n"))
    assert line == "<6>INFO node.test: AE X\\n<3>ERROR fake\\r\\\\n"


def test_stream_is_journal_matches_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as fh, open(tmp_path / "other", "w") as other:
        st = os.fstat(fh.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stream_is_journal(fh, env)
        assert not stream_is_journal(other, env)
        assert not stream_is_journal(fh, {})
        assert not stream_is_journal(fh, {"JOURNAL_STREAM": "garbage"})
        assert not stream_is_journal(io.StringIO(), env)  # no file descriptor


def test_setup_logging_picks_the_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("pynetdicom").level)
    with open(tmp_path / "err", "w") as fh:
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            handler = setup_logging("DEBUG", stream=fh)
            assert isinstance(handler.formatter, JournalFormatter)
            assert logging.getLogger().level == logging.DEBUG
            assert logging.getLogger("pynetdicom").level == logging.WARNING
            monkeypatch.delenv("JOURNAL_STREAM")
            handler = setup_logging("INFO", stream=fh)
            assert not isinstance(handler.formatter, JournalFormatter)
            with pytest.raises(ValueError, match="unknown log level"):
                setup_logging("LOUD", stream=fh)
        finally:
            root.handlers[:] = saved[1]
            root.setLevel(saved[0])
            logging.getLogger("pynetdicom").setLevel(saved[2])


def test_thread_exception_is_one_journal_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("pynetdicom").level, threading.excepthook)
    path = tmp_path / "err"
    try:
        with open(path, "w") as fh:
            st = os.fstat(fh.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
            setup_logging("INFO", stream=fh)

            def boom() -> None:
                raise RuntimeError("worker broke")

            t = threading.Thread(target=boom, name="worker-1")
            t.start()
            t.join()
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging.getLogger("pynetdicom").setLevel(saved[2])
        threading.excepthook = saved[3]
    lines = path.read_text().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("<2>CRITICAL node.logs: unhandled exception in thread worker-1\\nTraceback")
    assert lines[0].endswith("RuntimeError: worker broke")
