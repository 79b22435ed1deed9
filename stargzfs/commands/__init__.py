"""Sub-commands of the `stargzfs` CLI, one module each, each with register(subparsers)."""
