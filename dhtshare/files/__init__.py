"""Files: sharing through the DHT (file entries, provider records, listings) and liveness.

The piece layout and content ids they use are the base's ``content.py``.
"""

from __future__ import annotations
