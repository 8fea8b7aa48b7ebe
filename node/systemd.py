"""sd_notify(3) without dependencies: READY, STOPPING, WATCHDOG and STATUS messages.

Does nothing when the process was not started by systemd (no ``NOTIFY_SOCKET``).
"""
from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval_s"]


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send one notification (e.g. ``"READY=1"``); returns whether it was sent."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        sock.sendall(message.encode())
    return True


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit():
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6
