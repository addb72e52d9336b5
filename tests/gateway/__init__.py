"""Unit tests of hubcore.gateway's decisions."""
