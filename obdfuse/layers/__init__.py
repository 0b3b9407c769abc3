"""LSMT layers: sealed layers, writable layer, commit and the merged Stack (spec §3, §4)."""
