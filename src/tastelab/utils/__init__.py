"""Small shared utilities (atomic file operations)."""
