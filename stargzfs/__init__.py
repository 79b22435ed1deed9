"""stargzfs: containerd nydus-snapshotter's eStargz path, done lazily inside a FUSE filesystem."""

__version__ = "0.1.0"
