"""Command-line interface: one small module per command, parsing and printing only."""
