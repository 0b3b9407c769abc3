"""ZFile: overlaybd block-compressed random-access files (spec §1, §2).

`ZFileReader` reads any Blob holding a ZFile (tar-wrapped or not) as the Blob of
its uncompressed content; `ZFileWriter` writes one to a file object.
"""

from obdfuse.zfile.format import (
    ALGORITHMS,
    DEFAULT_BLOCK_SIZE,
    WRITER_BLOCK_SIZES,
    HeaderTrailer,
    is_zfile,
)
from obdfuse.zfile.reader import BadBlock, ZFileReader
from obdfuse.zfile.writer import UpstreamLimitError, ZFileWriter

__all__ = [
    "ALGORITHMS",
    "DEFAULT_BLOCK_SIZE",
    "WRITER_BLOCK_SIZES",
    "BadBlock",
    "HeaderTrailer",
    "UpstreamLimitError",
    "ZFileReader",
    "ZFileWriter",
    "is_zfile",
]
