"""Building overlaybd images from OCI images (`obdfuse convert`) and directories (`build`).

- `apply`: extract one OCI layer tar stream onto a directory, whiteouts included, safely.
- `oci`: OCI image layouts and descriptors (source images, layout output).
- `source`: resolve a source image (layout or registry) and fetch its layer blobs.
- `tardir`: a directory tree as a tar stream (so `build` goes through `apply` too).
- `workspace`: the work area and every mount/loop device in it, always torn down.
- `launcher`: a pre-started helper that runs `obdfuse mount`/`umount` by forking.
- `layerbuild`: one layer: writable upper over the lowers, filled, committed.
- `baselayer`: the cached, reproducible empty-filesystem base layer.
- `output`: config, manifest and annotations; write to a layout or push.
- `pipeline`: the `convert` and `build` pipelines.
- `progress`: progress bars on terminals only.

See docs/convert.md.
"""
