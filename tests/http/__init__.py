"""Unit tests of hubcore.http."""
