"""A download's state as one of four small frozen types, serialized by ``downloads --json``.

``Downloading`` (in progress), ``Paused`` (stopped; a restart resumes it),
``Complete`` (verified and under its final name) and ``Failed`` (with the
one-line error and its hint). All carry the same core fields; ``to_json`` gives
a plain dict::

    {"state": "downloading", "name": "a.iso", "size": 1048576, "bytes_done": 524288,
     "path": "/home/me/Downloads/a.iso.part", "sources": {"<peer id>": 262144, ...},
     "routes": {"<peer id>": "direct", ...}, "rate": 1250000.0, "peers": 3, "relayed": 0}

``sources`` maps a peer's printable id (``identity.format_id``) to the bytes of
verified-or-pending blocks it sent us; ``routes`` maps each peer we had a session with
to the route of its latest session: ``"direct"``, ``"punched"`` (a direct connection
made by hole punching) or ``"relayed"``. ``relayed`` counts the connected peers
reached through a relay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

__all__ = ["Complete", "DownloadStatus", "Downloading", "Failed", "Paused"]


@dataclass(frozen=True, slots=True)
class _Base:
    name: str
    size: int
    bytes_done: int
    path: str
    sources: dict[str, int] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)

    state: ClassVar[str] = "unknown"

    @property
    def fraction(self) -> float:
        """Progress from 0.0 to 1.0 (an empty file is 1.0)."""
        return 1.0 if self.size == 0 else self.bytes_done / self.size

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with ``state`` first."""
        return {
            "state": self.state,
            "name": self.name,
            "size": self.size,
            "bytes_done": self.bytes_done,
            "path": self.path,
            "sources": dict(sorted(self.sources.items())),
            "routes": dict(sorted(self.routes.items())),
        }


@dataclass(frozen=True, slots=True)
class Downloading(_Base):
    """In progress: ``rate`` in bytes/s over the last few seconds, ``peers`` connected,
    ``relayed`` of them through a relay."""

    rate: float = 0.0
    peers: int = 0
    relayed: int = 0

    state: ClassVar[str] = "downloading"

    def to_json(self) -> dict[str, Any]:
        return {
            **_Base.to_json(self),
            "rate": round(self.rate, 1),
            "peers": self.peers,
            "relayed": self.relayed,
        }


@dataclass(frozen=True, slots=True)
class Paused(_Base):
    """Stopped before completion; the partial file and resume state are kept."""

    state: ClassVar[str] = "paused"


@dataclass(frozen=True, slots=True)
class Complete(_Base):
    """Every piece verified; ``path`` is the final name."""

    seconds: float = 0.0

    state: ClassVar[str] = "complete"

    def to_json(self) -> dict[str, Any]:
        return {**_Base.to_json(self), "seconds": round(self.seconds, 3)}


@dataclass(frozen=True, slots=True)
class Failed(_Base):
    """Stopped by an error; ``error`` is its one-line message, ``hint`` what to do."""

    error: str = ""
    hint: str = ""

    state: ClassVar[str] = "failed"

    def to_json(self) -> dict[str, Any]:
        return {**_Base.to_json(self), "error": self.error, "hint": self.hint}


DownloadStatus: TypeAlias = Downloading | Paused | Complete | Failed
