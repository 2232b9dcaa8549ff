"""Puts the repository root on sys.path so that tests import the top-level modules under plain `pytest`."""
