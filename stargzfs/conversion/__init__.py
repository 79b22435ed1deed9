"""Lazy conversion: what a FUSE stat or open of `<hex>` / `image.boot` sets in motion.

One module per concern (docs/architecture.md follows a layer through them):
`provider` (the FUSE-facing seam and dispatch), `table` (metadata.db, re-read off the
event loop), `rootdirs` (the dirs this mount writes into, opened without following links),
`gate` (single-flight, backoff, "not eStargz" memory), `layer` (detect -> TOC -> builder,
copies for other snapshots of the digest), `image` (image.boot: the chain merged),
`builder` (the nydus-image compatible subprocess) and `state` (ROOT/stargzfs/state.json).
"""
