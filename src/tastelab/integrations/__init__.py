"""Bridges to other systems (Ray Data); each imports its dependency only when used."""
