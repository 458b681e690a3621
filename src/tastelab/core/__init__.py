"""Core layer: small, dependency-free building blocks every other layer may import (registries)."""
