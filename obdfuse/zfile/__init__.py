"""ZFile: overlaybd block-compressed random-access files (spec §1, §2)."""
