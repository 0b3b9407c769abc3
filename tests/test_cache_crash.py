"""kill -9 while the cache fills: a restarted cache serves only chunks that were whole."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import trio

from obdfuse.blob import BytesBlob
from obdfuse.cache import BlobCache
from obdfuse.registry.manifest import sha256_digest

CHUNK = 64 * 1024
SIZE = 8 << 20


def content() -> bytes:
    seed = hashlib.sha256(b"crash").digest()
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "little")).digest()
                    for i in range(SIZE // 32))


FILLER = textwrap.dedent(f"""
    import random, sys, trio
    sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent.parent)!r})
    from tests.test_cache_crash import content, CHUNK
    from obdfuse.blob import BytesBlob
    from obdfuse.cache import BlobCache
    from obdfuse.registry.manifest import sha256_digest

    data = content()
    cache = BlobCache(sys.argv[1], chunk_size=CHUNK)
    blob = cache.wrap(BytesBlob(data), sha256_digest(data))

    async def main():
        print("ready", flush=True)
        rng = random.Random()
        while True:
            off = rng.randrange(0, len(data))
            await blob.pread(off, rng.randrange(1, 5 * CHUNK))
            await trio.sleep(0)

    trio.run(main)
""")


def test_kill_during_fill_never_serves_partial_chunks(tmp_path):
    data = content()
    digest = sha256_digest(data)
    rng = random.Random(7)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", FILLER, str(tmp_path)],
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        cache = BlobCache(tmp_path, chunk_size=CHUNK)
        try:
            files = cache.files_for(digest, SIZE)
            present = files.present_indices()
            assert present, "the filler cached nothing before it was killed"
            for i in present:
                assert files.read(i * CHUNK, CHUNK) == data[i * CHUNK:(i + 1) * CHUNK], i

            class Refusing(BytesBlob):
                async def pread(self, offset, length):
                    raise AssertionError("refetch of a cached chunk")

            blob = cache.wrap(Refusing(data), digest)

            async def reread(blob=blob, present=present):
                for i in present[:50]:
                    assert await blob.pread(i * CHUNK, CHUNK) == data[i * CHUNK:(i + 1) * CHUNK]

            trio.run(reread)
        finally:
            cache.close()
