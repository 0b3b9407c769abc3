"""obdfuse's userspace iSCSI target (RFC 7143): sans-IO PDUs and sessions, SBC-3 disk
commands over a `BlockDevice`, and a thin trio TCP server.

`serve_iscsi(device, listen, iqn, chap, task_status)` is the entry point for the daemon.
"""

from obdfuse.iscsi.login import ChapCredentials
from obdfuse.iscsi.server import DEFAULT_IQN, IscsiServer, Limits, serve_iscsi

__all__ = ["DEFAULT_IQN", "ChapCredentials", "IscsiServer", "Limits", "serve_iscsi"]
