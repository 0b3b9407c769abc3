"""obdfuse: overlaybd (DADI) block images, read lazily, served through FUSE and iSCSI."""

__version__ = "0.1.0"
