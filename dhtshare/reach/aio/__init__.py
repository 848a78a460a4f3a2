"""Reachability: address discovery, dial-backs, relays and hole punching (issue #16)."""
