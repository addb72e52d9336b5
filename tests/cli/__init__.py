"""Tests of the hubcore command line."""
