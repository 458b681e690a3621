"""The package version, in the lowest layer so that any module (a URL fetch's User-Agent, training
provenance, the judge's report) can name it without importing the public API package above everything."""

__version__ = "0.1.0"
