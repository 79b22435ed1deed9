"""The snapshotter's metadata.db: a lock-free bbolt reader (bolt) and containerd's schema (store)."""
