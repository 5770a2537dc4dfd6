class DenseSparseError(Exception):
    """A user-facing error: its message is one line that names the problem and the fix."""
