"""Sub-commands of `stargzfs-image`, one module each, each with register(subparsers)."""
