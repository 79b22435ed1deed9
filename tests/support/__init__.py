"""Fixtures and helpers that start real parts (registry, containerd, kernel mounts)."""
