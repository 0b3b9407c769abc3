"""LSMT layers: sealed layers, writable layer, commit and the merged Stack (spec §3, §4).

Modules: `segment` (16-byte mapping codec, merge rule), `index` (flat indexes,
overlay, log resolution), `header` (4096-byte header/trailer slots), `sealed`
(read-only layers, tar → ZFile → LSMT detection), `writable` (RW layers),
`commit` (compaction), `stack` (the merged BlockDevice), `config`
(config.v1.json), `dump` (sparse raw export).
"""

from obdfuse.layers.commit import CommitOptions, commit_layer
from obdfuse.layers.sealed import SealedLayer, open_layer
from obdfuse.layers.stack import Stack
from obdfuse.layers.writable import WritableLayer

__all__ = ["CommitOptions", "SealedLayer", "Stack", "WritableLayer", "commit_layer", "open_layer"]
