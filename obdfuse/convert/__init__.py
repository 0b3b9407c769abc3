"""Building overlaybd images: apply OCI layer tars to an ext4, read/write OCI images, convert.

- `apply`: extract one OCI layer tar stream onto a directory with whiteout semantics, safely.
- `oci`: OCI image layouts and descriptors (source images and layout output).
"""
