"""Reachability (issue #16): observed addresses and the dial-back test (``autonat``), relay
limits and the punch schedule. Pure: ``now`` is passed in; the I/O is in ``reach.aio``."""
