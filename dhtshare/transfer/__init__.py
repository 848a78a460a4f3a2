"""Transfer: piece picking, rate limits, parallel download and upload serving."""

from __future__ import annotations
