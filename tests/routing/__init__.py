"""Unit tests of hubcore.routing."""
