"""Store: pieces on disk (``partial``) and resume state (``resume``)."""

from __future__ import annotations
