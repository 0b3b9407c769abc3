"""The systemd readiness protocol (sd_notify): one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("obdfuse.daemon")


def sd_notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") to the service manager, if any.

    Returns False when not run under a notify-aware supervisor. Failures are
    logged, never raised: readiness reporting must not take the mount down.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address.lstrip("\0"), exc)
        return False
    return True
