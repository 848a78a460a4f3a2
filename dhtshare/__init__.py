"""dhtshare: group file sharing with parallel, verified downloads and no central server."""

from __future__ import annotations

from dhtshare.errors import DhtshareError
from dhtshare.identity import Identity

__all__ = ["DhtshareError", "Identity", "__version__"]

__version__ = "0.1.0"
