"""The FUSE side: pyfuse3 passthrough (ops), inode table, provider seam, mount daemon."""
