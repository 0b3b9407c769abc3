"""The exception hierarchy shared by every room.

Only these (and OSError) may cross a room boundary; the CLI turns them into one
line on stderr, FUSE into EIO, the iSCSI target into sense data.
"""


class ObdfuseError(Exception):
    """Base of every error obdfuse raises on purpose; its message is user-facing."""


class FormatError(ObdfuseError):
    """Input is not in the expected format, or is hostile (bad magic, bounds, sizes)."""


class CorruptDataError(FormatError):
    """Data failed an integrity check (checksum, digest, decompression)."""


class RemoteError(ObdfuseError):
    """A remote source (registry) failed or could not be reached in time."""
