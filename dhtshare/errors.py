"""Every failure dhtshare reports, as one tree.

    DhtshareError                 a failure a user can see: ``message`` plus a ``hint``
     ├── IdentityError            no identity, wrong passphrase, damaged key file
     ├── RecordError              a record that does not decode or does not verify
     ├── DhtError                 the DHT could not store or find something
     ├── GroupError               unknown group, not a member, not the owner
     ├── FileShareError           missing path, unknown file, no providers
     ├── StoreError               disk full, target exists, partial file damaged
     ├── NodeError                node not running, port in use, control socket trouble
     └── ProtocolError            a peer connection broke its rules
          ├── LocalProtocolError  we tried something the protocol forbids (our bug)
          └── RemoteProtocolError the peer did; carries a ``reason`` code sent in a Reject

``codec.DecodeError`` is deliberately *not* in this tree: it is internal, and each
boundary (records, wire) turns it into ``RecordError`` or ``RemoteProtocolError``.
"""

from __future__ import annotations

__all__ = [
    "DhtError",
    "DhtshareError",
    "FileShareError",
    "GroupError",
    "IdentityError",
    "LocalProtocolError",
    "NodeError",
    "ProtocolError",
    "RecordError",
    "RemoteProtocolError",
    "StoreError",
]


class DhtshareError(Exception):
    """A failure with a one-line ``message`` and a ``hint`` saying what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class IdentityError(DhtshareError):
    """No identity, a wrong passphrase, or a key file that does not load."""


class RecordError(DhtshareError):
    """A record that is malformed, oversized, expired, or fails verification."""


class DhtError(DhtshareError):
    """The DHT could not store or find what was asked."""


class GroupError(DhtshareError):
    """Unknown group, not a member, not the owner, or an invalid roster."""


class FileShareError(DhtshareError):
    """A path that does not exist, an unknown file, or no providers for it."""


class StoreError(DhtshareError):
    """Disk trouble: no space, a target that already exists, a damaged partial file."""


class NodeError(DhtshareError):
    """The node is not running, its port is taken, or its control socket failed."""


class ProtocolError(DhtshareError):
    """A peer connection broke the wire protocol's rules."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; ``reason`` is the code we send it in a Reject."""

    def __init__(self, message: str, reason: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
