"""Unit tests of hubcore.governance."""
