"""Unit tests of hubcore.accounting."""
