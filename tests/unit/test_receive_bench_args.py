"""Command line of the receive benchmark (``benchmarks/receive.py``): ``--senders``."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.receive import _storescu_cmd, build_parser


def test_senders_defaults_to_one() -> None:
    assert build_parser().parse_args([]).senders == 1


def test_senders_parsed() -> None:
    args = build_parser().parse_args(["--senders", "4", "--slices", "150"])
    assert (args.senders, args.slices) == (4, 150)


@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_senders_rejects_non_positive(value: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--senders", value])


def test_storescu_cmd_sends_one_directory_with_the_pdu() -> None:
    cmd = _storescu_cmd(11112, Path("/tmp/s0"), 131072)
    assert cmd[0] == "storescu"
    assert cmd[-4:] == ["127.0.0.1", "11112", "+sd", "/tmp/s0"]
    assert "--max-send-pdu" in cmd and "131072" in cmd


def test_storescu_cmd_dcmtk_default_pdu() -> None:
    assert "--max-pdu" not in _storescu_cmd(11112, Path("/tmp/s0"), None)
