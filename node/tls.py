"""DICOM TLS contexts (PS3.15 Annex B, BCP 195 profile): TLS 1.2 or later, peers verified.

:func:`server_context` builds the context the Storage SCP listens with
(:attr:`dicom.scp.ScpConfig.ssl_context`); :func:`client_context` the one the SCU sends
with (``dicom.scu.send_paths(..., ssl_context=...)``). Both

* refuse SSLv3, TLS 1.0 and TLS 1.1 (``minimum_version = TLSVersion.TLSv1_2``);
* offer only forward-secret AEAD cipher suites for TLS 1.2 (TLS 1.3 suites are always
  AEAD and forward secret);
* verify the peer's certificate chain against ``ca_file``;
* turn TLS compression and renegotiation off.

Every file is checked before it is handed to OpenSSL, so a missing, unreadable or
malformed file raises :class:`TlsConfigError` whose message names the file and the
settings key it came from, instead of OpenSSL's bare ``[X509] PEM lib``.

Peer *identity* is the certificate chain: DICOM TLS peers are commonly addressed by IP
and their certificates rarely carry matching subject alternative names, so host name
checking is off by default in :func:`client_context` (``check_hostname=True`` turns it
on; the caller must then pass ``server_hostname`` when wrapping the socket).
"""
from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from node.settings import SettingsError

__all__ = ["TlsConfigError", "server_context", "client_context", "TLS12_CIPHERS"]

#: OpenSSL cipher string for TLS 1.2: ECDHE/DHE key exchange with AES-GCM or ChaCha20.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"


class TlsConfigError(SettingsError):
    """A TLS certificate, key or CA file is missing, unreadable or invalid.

    The message starts with the settings key (``tls.certificate``, ``tls.private_key``,
    ``tls.ca_file``) and names the file. A :class:`~node.settings.SettingsError` (and so a
    :class:`ValueError`): the command line reports it as a configuration error (exit 2).
    """


def _check_file(path: str | os.PathLike[str] | None, key: str) -> Path:
    """Return `path` as a :class:`~pathlib.Path` after checking it is a readable file.

    Parameters
    ----------
    path : str or os.PathLike or None
        The configured path.
    key : str
        Settings key the path came from, used in error messages.

    Returns
    -------
    pathlib.Path
        The path.

    Raises
    ------
    TlsConfigError
        If the path is empty, missing, not a regular file or not readable.
    """
    if path is None or str(path) == "":
        raise TlsConfigError(f"{key}: no file configured")
    p = Path(path)
    if not p.exists():
        raise TlsConfigError(f"{key}: file {str(p)!r} does not exist")
    if not p.is_file():
        raise TlsConfigError(f"{key}: {str(p)!r} is not a regular file")
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{key}: file {str(p)!r} is not readable ({exc.strerror or exc})") from None
    if b"-----BEGIN" not in text:
        raise TlsConfigError(f"{key}: file {str(p)!r} is not PEM (no '-----BEGIN' line)")
    return p


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_ciphers(TLS12_CIPHERS)


def _load_ca(ctx: ssl.SSLContext, ca_file: str | os.PathLike[str], key: str = "tls.ca_file") -> None:
    ca = _check_file(ca_file, key)
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"{key}: file {str(ca)!r} holds no valid PEM CA certificate ({exc})") from None


def _load_chain(
    ctx: ssl.SSLContext,
    certificate: str | os.PathLike[str],
    private_key: str | os.PathLike[str],
    cert_key: str = "tls.certificate",
    key_key: str = "tls.private_key",
) -> None:
    cert = _check_file(certificate, cert_key)
    key = _check_file(private_key, key_key)
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        reason = str(getattr(exc, "reason", "") or exc)
        if "KEY_VALUES_MISMATCH" in reason.upper() or "mismatch" in reason.lower():
            raise TlsConfigError(
                f"{key_key}: key in {str(key)!r} does not match the certificate in {str(cert)!r}"
            ) from None
        raise TlsConfigError(
            f"{cert_key}/{key_key}: could not load certificate {str(cert)!r} "
            f"with key {str(key)!r} ({reason})"
        ) from None


def server_context(
    certificate: str | os.PathLike[str],
    private_key: str | os.PathLike[str],
    ca_file: str | os.PathLike[str],
    require_client_certificate: bool = True,
) -> ssl.SSLContext:
    """Return the TLS context of the DICOM listener.

    Parameters
    ----------
    certificate : str or os.PathLike
        PEM certificate (chain) of this node (``tls.certificate``).
    private_key : str or os.PathLike
        PEM private key matching `certificate`, unencrypted (``tls.private_key``).
    ca_file : str or os.PathLike
        PEM bundle of the CAs that sign peers' certificates (``tls.ca_file``).
    require_client_certificate : bool, default True
        ``True``: a client without a certificate signed by `ca_file` is refused during
        the handshake (mutual TLS). ``False``: a client certificate is verified if one
        is presented, but not required.

    Returns
    -------
    ssl.SSLContext
        Server-side context, TLS 1.2 minimum.

    Raises
    ------
    TlsConfigError
        If a file is missing, unreadable or invalid, or the key does not match the
        certificate; the message names the file.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_chain(ctx, certificate, private_key)
    _load_ca(ctx, ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    ca_file: str | os.PathLike[str],
    certificate: str | os.PathLike[str] | None = None,
    private_key: str | os.PathLike[str] | None = None,
    *,
    check_hostname: bool = False,
    names: Mapping[str, str] | None = None,
) -> ssl.SSLContext:
    """Return the TLS context for outbound associations (C-STORE / C-ECHO SCU).

    Parameters
    ----------
    ca_file : str or os.PathLike
        PEM bundle of the CAs that sign the destinations' certificates.
    certificate, private_key : str or os.PathLike, optional
        This node's PEM certificate and key, presented to destinations that require
        client certificates. Give both or neither.
    check_hostname : bool, default False
        Also match the server certificate against the host name; the caller must then
        pass ``server_hostname`` when wrapping the socket.
    names : mapping, optional
        What error messages call the three files instead of their settings keys
        ``tls.ca_file``, ``tls.certificate`` and ``tls.private_key`` (the command line
        maps them to ``--ca-file``, ``--certificate`` and ``--private-key``).

    Returns
    -------
    ssl.SSLContext
        Client-side context, TLS 1.2 minimum, server certificate required and verified.

    Raises
    ------
    TlsConfigError
        If a file is missing, unreadable or invalid, or only one of `certificate` and
        `private_key` is given.
    """
    named = {k: (names or {}).get(k, k) for k in ("tls.ca_file", "tls.certificate", "tls.private_key")}
    has_cert = certificate is not None and str(certificate) != ""
    has_key = private_key is not None and str(private_key) != ""
    if has_cert != has_key:
        missing = named["tls.private_key"] if has_cert else named["tls.certificate"]
        raise TlsConfigError(
            f"{missing}: {named['tls.certificate']} and {named['tls.private_key']} must be given together"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = bool(check_hostname)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca_file, named["tls.ca_file"])
    if has_cert and certificate is not None and private_key is not None:
        _load_chain(ctx, certificate, private_key, named["tls.certificate"], named["tls.private_key"])
    return ctx
