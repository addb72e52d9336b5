"""Tests of hubcore.ops."""
