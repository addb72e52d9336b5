"""hubcore: a self-hosted gateway between AI coding clients and vendor APIs."""

__version__ = "0.1.0"
