"""Every failure dhtshare reports, as one tree.

    DhtshareError                   a failure a user can see: ``message`` plus a ``hint``
     ├── IdentityError              no identity, wrong passphrase, damaged key file
     ├── RecordError                a record that does not decode or does not verify
     ├── DhtError                   the DHT could not store or find something
     ├── GroupError                 unknown group, not a member, not the owner
     │    ├── StaleRosterError      the DHT offered only a roster older than one we verified
     │    └── OwnershipForkError    two rosters whose hand-over chains fork undecidably
     ├── FileShareError             missing path, unknown file, no providers
     ├── StoreError                 disk full, target exists, partial file damaged
     ├── NodeError                  node not running, port in use, control socket trouble
     │    └── MalformedReply        a control reply that does not have the expected shape
     ├── ProtocolError              a peer connection broke its rules
     │    ├── LocalProtocolError    we tried something the protocol forbids (our bug)
     │    └── RemoteProtocolError   the peer did; carries a ``reason`` code sent in a Reject
     ├── ScenarioError              a simulation scenario or option that makes no sense
     └── WorkerError                a simulation worker failed or did not answer in time

Rule 1: every exception class of dhtshare is defined here, nowhere else.
Rule 2: ``BY_NAME`` is the tree by class name: the control socket sends an error's name
and the CLI raises the same class again (an unknown name becomes a ``NodeError``).
Rule 3: ``DecodeError`` (what ``codec`` raises) is defined here too, but deliberately
*not* in the tree: it is internal, and each boundary (records, wire) turns it into its
own error with one ``Malformed`` guard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType, TracebackType

__all__ = [
    "BY_NAME",
    "VERSION_HINT",
    "DecodeError",
    "DhtError",
    "DhtshareError",
    "FileShareError",
    "GroupError",
    "IdentityError",
    "LocalProtocolError",
    "Malformed",
    "MalformedReply",
    "NodeError",
    "OwnershipForkError",
    "ProtocolError",
    "RecordError",
    "RemoteProtocolError",
    "ScenarioError",
    "StaleRosterError",
    "StoreError",
    "WorkerError",
]


VERSION_HINT = "is the CLI the same version as the node? see node.log"
"""The hint for a control reply or request the other side does not understand."""


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


class StaleRosterError(GroupError):
    """The DHT offered only a roster older than one this node already verified."""


class OwnershipForkError(GroupError):
    """Two valid rosters whose hand-over chains fork at a link this node cannot decide."""


class FileShareError(DhtshareError):
    """A path that does not exist, an unknown file, or no providers for it."""


class StoreError(DhtshareError):
    """Disk trouble: no space, a target that already exists, a damaged partial file."""


class NodeError(DhtshareError):
    """The node is not running, its port is taken, or its control socket failed."""


class MalformedReply(NodeError):
    """The node's control reply does not have the shape the command expects."""

    def __init__(self, message: str, hint: str = VERSION_HINT) -> None:
        super().__init__(message, hint)


class ProtocolError(DhtshareError):
    """A peer connection broke the wire protocol's rules."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; ``reason`` is the code we send it in a Reject."""

    def __init__(self, message: str, reason: int = 1) -> None:
        super().__init__(message)
        self.reason = reason


class ScenarioError(DhtshareError):
    """A simulation scenario file or option that does not make sense."""


class WorkerError(DhtshareError):
    """A simulation worker process failed, answered wrongly or did not answer in time."""


def _tree(cls: type[DhtshareError]) -> Iterator[type[DhtshareError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _tree(sub)


BY_NAME: Mapping[str, type[DhtshareError]] = MappingProxyType(
    {cls.__name__: cls for cls in _tree(DhtshareError)}
)
"""Every class above by its name (built here, once, so later subclasses are not in it)."""


class DecodeError(ValueError):
    """Input that is short, oversized, or has bytes left over (raised by ``codec``)."""


class Malformed:
    """The one boundary from ``DecodeError`` to a typed error, as a context manager.

    Built once per boundary (``Malformed("record", RecordError)``): a ``ValueError`` raised
    inside the ``with`` block (``DecodeError`` is one; so is a field's own check) leaves it
    as ``error("malformed <what>: <why>")``, chained to the cause. Other errors pass.
    """

    __slots__ = ("error", "what")

    def __init__(self, what: str, error: Callable[[str], Exception]) -> None:
        self.what, self.error = what, error

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, ValueError):
            raise self.error(f"malformed {self.what}: {exc}") from exc
