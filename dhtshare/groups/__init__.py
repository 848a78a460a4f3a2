"""Groups: rosters signed by their owner, join requests, hand-over, membership checks.

``rules`` is pure (it decides); ``service`` is async (it publishes and fetches through the DHT).
"""

from __future__ import annotations
