"""The thread driver: runs flows (``syncmap.flows``) with blocking I/O."""
