"""``python -m dhtshare`` runs the CLI."""

from __future__ import annotations

from dhtshare.cli.main import main

main()
