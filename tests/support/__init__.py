"""Helpers the tests share, each written once: ``nodes`` (whole nodes in one process),
``swarm`` (a source file and a roster for transfer tests), ``scripts`` (the scripts of
``simulations/`` as modules)."""
