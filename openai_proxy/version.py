"""The proxy's version: one place, read by the pages, /health and the package metadata."""

__version__ = "1.0.0"
