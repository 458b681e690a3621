"""Small shared utilities (atomic file operations, the JSON summary hook)."""
