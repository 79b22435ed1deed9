"""eStargz: footers, the one TOC model, one codec object per compression, TOC fetching.

Import the modules directly (`stargzfs.estargz.fetch`, ...): `toc` is on the builder's
start-up path and must not drag in the fetch stack.
"""
