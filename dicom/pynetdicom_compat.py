"""Where the node reaches below pynetdicom's public API: socket deadlines, read caps, TLS.

pynetdicom gives an acceptor association no deadline on a partly received PDU, reads a PDU
of any announced length, and performs the TLS handshake in its accept loop with no timeout.
The functions here fix that per association, from the SCP's ``EVT_CONN_OPEN`` and
``EVT_ACCEPTED`` handlers. Every private name used is listed with the pynetdicom version it
was read from (3.0.4, the tested version pinned in ``pyproject.toml``):

* ``Association.dul`` (public attribute) and ``DULServiceProvider.socket`` (public): the
  :class:`pynetdicom.transport.AssociationSocket` of the association;
* ``AssociationSocket.socket`` (public attribute): the raw :class:`socket.socket` (3.0.4:
  ``transport.py`` line 335); replacing it with a wrapped :class:`ssl.SSLSocket` is what
  pynetdicom's own requestor path does after ``wrap_socket``;
* ``AssociationSocket.recv`` (public method, 3.0.4 ``transport.py`` line 570): wrapped
  per instance by :func:`guard_reads`; pynetdicom's ``DULServiceProvider._read_pdu_data``
  (private, ``dul.py`` line 245) calls ``recv(6)`` then ``recv(pdu_length)``, and
  ``dicom.fast_store`` does the same.

Every function declines (returns ``False``) when the objects are not as expected, leaving
the association as pynetdicom made it.
"""
from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

__all__ = ["A_ABORT_INVALID_PDU_PARAMETER", "guard_reads", "raw_socket", "set_deadline", "tls_handshake"]

LOGGER = logging.getLogger(__name__)

#: A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8.
A_ABORT_INVALID_PDU_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"


def _association_socket(assoc: Any) -> Any:
    dul = getattr(assoc, "dul", None)
    return getattr(dul, "socket", None) if dul is not None else None


def raw_socket(assoc: Any) -> socket.socket | None:
    """The association's raw (or TLS-wrapped) socket, or ``None``."""
    sock = _association_socket(assoc)
    raw = getattr(sock, "socket", None) if sock is not None else None
    return raw if isinstance(raw, socket.socket) else None


def set_deadline(assoc: Any, seconds: float) -> bool:
    """Give every blocking read and write on the association's socket a deadline.

    An accepted socket inherits no timeout from pynetdicom's listening socket (Python makes
    it blocking), so a peer that stops in the middle of a PDU would hold its association
    thread and slot forever. With a deadline the read raises ``TimeoutError``, pynetdicom
    sees the transport close (Evt17) and the association ends.
    """
    raw = raw_socket(assoc)
    if raw is None:
        return False
    try:
        raw.settimeout(float(seconds))
    except OSError:
        return False
    return True


def guard_reads(assoc: Any, cap: int, on_refuse: Callable[[int], None] | None = None) -> bool:
    """Refuse any read longer than `cap` bytes: send an A-ABORT and close instead.

    pynetdicom (and a tuned reader) read a PDU by the length its header announces; a header
    announcing 4 GiB made the node allocate it. Called after any other replacement of
    ``recv`` (it wraps whatever ``recv`` the association socket has now).

    Parameters
    ----------
    assoc
        The association.
    cap
        Longest read allowed, in bytes.
    on_refuse
        Called with the announced length when a read is refused (for logging).
    """
    sock = _association_socket(assoc)
    inner = getattr(sock, "recv", None) if sock is not None else None
    if inner is None or not callable(inner):
        return False

    def recv(nr_bytes: int) -> Any:
        if nr_bytes > cap:
            if on_refuse is not None:
                on_refuse(nr_bytes)
            raw = raw_socket(assoc)
            if raw is not None:
                try:
                    raw.sendall(A_ABORT_INVALID_PDU_PARAMETER)
                except OSError:
                    pass
            raise OSError(f"peer announced a PDU of {nr_bytes} bytes, more than the maximum {cap}")
        return inner(nr_bytes)

    sock.recv = recv
    return True


def tls_handshake(assoc: Any, context: ssl.SSLContext, timeout: float) -> str | None:
    """Wrap the association's socket with TLS and complete the handshake within `timeout`.

    pynetdicom's server wraps (and handshakes) in its accept loop, where a client that
    never finishes the handshake blocks every other connection. The SCP starts its server
    without TLS and calls this from ``EVT_CONN_OPEN`` instead, in the connection's thread.

    Returns
    -------
    str or None
        ``None`` on success; otherwise why the handshake failed (the socket is then closed).
    """
    sock = _association_socket(assoc)
    raw = raw_socket(assoc)
    if sock is None or raw is None:
        return "no socket"
    try:
        raw.settimeout(timeout)
        wrapped = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        wrapped.do_handshake()
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        try:
            raw.close()
        except OSError:
            pass
        return f"TLS handshake failed: {reason}"
    sock.socket = wrapped
    return None
