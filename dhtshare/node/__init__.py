"""The running node: its services composed, the control socket, downloads and settings."""

from __future__ import annotations
