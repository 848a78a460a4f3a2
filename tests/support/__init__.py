"""Helpers the tests share, each written once: ``nodes`` (whole nodes in one process),
``swarm`` (files, rosters and seeders for transfer tests)."""
