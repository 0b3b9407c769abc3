"""OCI registry access: image references, manifests, auth, range GETs, uploads.

Owns the HTTP side only (aiohttp on the asyncio bridge). Caching lives in
`obdfuse.cache`, decompression in `obdfuse.zfile`.
"""
