"""What an operator sees: the journal format, configuration errors, refused TLS and ``--tls``.

Every ``i3node`` here runs as a real process; sockets, certificates and the audit file are real.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.node_fixtures import wait_until
from tests.fixtures.pki import OPENSSL, Pki

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cr3t-Pw"
PRIORITY = re.compile(r"^<[0-7]>")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")

needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command line not installed")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(extra)
    return env


def i3node(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env or _env())


def _config(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nstate_dir = "{tmp_path / "state"}"\njob_workers = 0\n' + text
    )
    return cfg


def _assert_one_config_error(res: subprocess.CompletedProcess[str], key: str) -> str:
    """Exit 2, exactly one stderr line ``i3node: configuration error: <key>: ...``, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if "configuration error" in ln]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"i3node: configuration error: {key}: "), lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert PASSWORD not in res.stderr + res.stdout
    return lines[0]


# -- 1. journald -------------------------------------------------------------------------


def _journal_run(tmp_path: Path, args: list[str], stop_after: str | None = None) -> tuple[int, list[str]]:
    """Run ``i3node`` with stderr on a file and JOURNAL_STREAM naming that file (as systemd does)."""
    err = tmp_path / "stderr.log"
    with open(err, "w") as fh:
        st = os.fstat(fh.fileno())
        env = _env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", *args], stdout=subprocess.DEVNULL, stderr=fh,
                                cwd=REPO, env=env)
        try:
            if stop_after is not None:
                assert wait_until(lambda: stop_after in err.read_text(), timeout=60), err.read_text()
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, err.read_text().splitlines()


def test_serve_logs_in_journal_format(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "[dicom]\nport = 0\n")
    rc, lines = _journal_run(tmp_path, ["serve", "--config", str(cfg)], stop_after="i3node listening")
    assert rc == 0, lines
    assert lines and all(PRIORITY.match(ln) for ln in lines), lines
    assert not any(TIMESTAMP.search(ln) for ln in lines), lines
    assert any(ln.startswith("<6>INFO node.app: i3node listening as I3NODE") for ln in lines), lines


def test_journal_format_only_when_journal_stream_is_stderr(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "[dicom]\nport = 0\n")
    other = tmp_path / "not-stderr"
    other.write_text("")
    st = os.stat(other)
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert TIMESTAMP.match(first) and not PRIORITY.match(first), first


def test_configuration_error_in_journal_is_an_error_entry(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _config(tmp_path, f"[dicom]\nport = {port}\n")
        rc, lines = _journal_run(tmp_path, ["serve", "--config", str(cfg)])
    assert rc == 2
    assert all(PRIORITY.match(ln) for ln in lines), lines
    assert [ln for ln in lines if "configuration error" in ln] == [
        f"<3>i3node: configuration error: dicom.port: cannot listen on 127.0.0.1:{port}: "
        "it is already in use"
    ]


# -- 2. configuration errors ------------------------------------------------------------------


def test_port_in_use_names_dicom_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = i3node("serve", "--config", str(_config(tmp_path, f"[dicom]\nport = {port}\n")))
    line = _assert_one_config_error(res, "dicom.port")
    assert f"127.0.0.1:{port}" in line and "already in use" in line


@pytest.mark.parametrize("missing", ["certificate", "private_key", "ca_file"])
def test_missing_tls_file_names_its_key(tmp_path: Path, pki: Pki, missing: str) -> None:
    files = {"certificate": pki.server_cert, "private_key": pki.server_key, "ca_file": pki.ca}
    files[missing] = tmp_path / "nope.pem"
    tls = "".join(f'{k} = "{v}"\n' for k, v in files.items())
    res = i3node("serve", "--config", str(_config(tmp_path, f"[dicom]\nport = 0\ntls = true\n[tls]\n{tls}")))
    line = _assert_one_config_error(res, f"tls.{missing}")
    assert "nope.pem" in line and "does not exist" in line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_database_names_the_url_without_password(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://i3node:{PASSWORD}@127.0.0.1:{_free_port()}/i3node"
    res = i3node("serve", "--config", str(_config(tmp_path, f'[dicom]\nport = 0\n[storage]\ndatabase_url = "{url}"\n')))
    line = _assert_one_config_error(res, "storage.database_url")
    assert "postgresql+psycopg://i3node:***@127.0.0.1:" in line


def test_missing_database_driver_says_what_to_install(tmp_path: Path) -> None:
    # A psycopg that cannot be imported, first on the path: as if the extra were not installed.
    fake = tmp_path / "fake" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'psycopg'\", name='psycopg')\n")
    url = f"postgresql+psycopg://i3node:{PASSWORD}@127.0.0.1:5432/i3node"
    cfg = _config(tmp_path, f'[dicom]\nport = 0\n[storage]\ndatabase_url = "{url}"\n')
    res = i3node("serve", "--config", str(cfg), env=_env(PYTHONPATH=str(tmp_path / "fake")))
    line = _assert_one_config_error(res, "storage.database_url")
    assert "'psycopg' is not installed" in line and "pip install 'i3node[postgres]'" in line


# -- 3 and 4. TLS ---------------------------------------------------------------------------------


@pytest.fixture
def tls_node(node_factory: Any, pki: Pki) -> Iterator[Any]:
    yield node_factory(
        node={"job_workers": 0},
        dicom={"tls": True, "acse_timeout_s": 5},
        tls={"certificate": str(pki.server_cert), "private_key": str(pki.server_key), "ca_file": str(pki.ca)},
    )


@pytest.fixture
def ct_dir(tmp_path: Path) -> Path:
    from dicom.synthetic import build_ct_series, write_datasets

    write_datasets(build_ct_series(np.zeros((3, 8, 8), dtype=np.float32), (2.0, 1.0, 1.0)), tmp_path / "ct")
    return tmp_path / "ct"


def _tls_rejections(app: Any) -> list[dict[str, Any]]:
    events = [json.loads(ln) for ln in app.settings.audit_path.read_text().splitlines()]
    return [e for e in events if e["event"] == "association_rejected" and e.get("detail", {}).get("stage") == "tls"]


@needs_openssl
def test_refused_handshakes_are_logged_and_audited(
    tls_node: Any, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    import ssl

    from node.tls import client_context

    caplog.set_level("WARNING", logger="dicom.scp")

    def handshake(ctx: ssl.SSLContext) -> None:
        with socket.create_connection(("127.0.0.1", tls_node.port), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    tls.settimeout(5)
                    tls.recv(1)  # TLS 1.3: the server's verdict on our certificate comes after the handshake
            except (ssl.SSLError, OSError):
                pass

    handshake(client_context(pki.ca))  # no client certificate
    handshake(client_context(pki.ca, pki.rogue_cert, pki.rogue_key))  # certificate from an unknown CA
    assert wait_until(lambda: len(_tls_rejections(tls_node)) >= 2, timeout=15), _tls_rejections(tls_node)
    reasons = [e["detail"]["reason"] for e in _tls_rejections(tls_node)]
    assert reasons == ["TLS handshake failed: no client certificate",
                       "TLS handshake failed: certificate verify failed: unable to get local issuer certificate"]
    for e in _tls_rejections(tls_node):
        assert e["outcome"] == "minor_failure" and e["event_id"]["meaning"] == "User Authentication"
        assert e["participants"][1]["address"] == "127.0.0.1"
    warnings = [r.getMessage() for r in caplog.records if r.name == "dicom.scp" and "refused" in r.getMessage()]
    assert any(re.search(r"127\.0\.0\.1:\d+ refused: TLS handshake failed: no client certificate", w)
               for w in warnings), warnings
    assert any("certificate verify failed" in w for w in warnings), warnings


@needs_openssl
def test_send_and_echo_with_tls(tls_node: Any, pki: Pki, ct_dir: Path) -> None:
    to = f"I3NODE@127.0.0.1:{tls_node.port}"
    mine = ["--tls", "--ca-file", str(pki.ca), "--certificate", str(pki.client_cert), "--private-key",
            str(pki.client_key)]
    res = i3node("echo", "--to", to, *mine)
    assert res.returncode == 0 and "success" in res.stdout, res.stderr
    res = i3node("send", str(ct_dir), "--to", to, *mine)
    assert res.returncode == 0, res.stderr
    assert "3 success, 0 warning, 0 failure" in res.stdout
    assert wait_until(lambda: tls_node.store.count_instances() == 3, timeout=10)


@needs_openssl
def test_tls_failures_are_explained(tls_node: Any, pki: Pki, ct_dir: Path) -> None:
    to = f"I3NODE@127.0.0.1:{tls_node.port}"
    cert = ["--certificate", str(pki.client_cert), "--private-key", str(pki.client_key)]
    res = i3node("send", str(ct_dir), "--to", to, "--tls", "--ca-file", str(pki.rogue_ca), *cert)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "certificate verify failed" in res.stderr and "--ca-file" in res.stderr, res.stderr
    res = i3node("echo", "--to", to, "--tls", "--ca-file", str(pki.ca))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "requires a client certificate" in res.stderr, res.stderr
    res = i3node("send", str(ct_dir), "--to", to)  # plain TCP to a TLS port
    assert res.returncode == 1 and "Traceback" not in res.stderr
    res = i3node("send", str(ct_dir), "--to", to, "--tls")
    assert res.returncode == 2 and "--tls needs --ca-file" in res.stderr
    res = i3node("echo", "--to", to, "--ca-file", str(pki.ca))
    assert res.returncode == 2 and "--ca-file: only with --tls" in res.stderr
    res = i3node("echo", "--to", to, "--tls", "--ca-file", str(pki.ca / "nope"))
    assert res.returncode == 2 and "--ca-file: file" in res.stderr and "Traceback" not in res.stderr
    assert tls_node.store.count_instances() == 0


def test_database_refusing_the_password_names_the_url_without_it(tmp_path: Path, pg_cluster: Any) -> None:
    url = f"postgresql+psycopg://{pg_cluster.user}:{PASSWORD}@127.0.0.1:{pg_cluster.port}/postgres"
    res = i3node("serve", "--config", str(_config(tmp_path, f'[dicom]\nport = 0\n[storage]\ndatabase_url = "{url}"\n')))
    line = _assert_one_config_error(res, "storage.database_url")
    assert f"{pg_cluster.user}:***@127.0.0.1:{pg_cluster.port}" in line
    assert "password authentication failed" in line, line
