"""Files: piece layout and content ids (``content``), sharing and file listings."""

from __future__ import annotations
