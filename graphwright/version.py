"""The package version (a foundation module: export metadata reads it without importing the package root)."""

__version__ = "0.1.0"
