"""The state directory of one node, and the name of every file in it (paths only, no I/O).

    identity.json     the key (0600)                 groups.json      group state
    dht.json          DHT node id + contacts         shares.json      what we serve
    hashes/<cid>      piece hashes of a share        downloads.json   downloads and their state
    resume/<cid>.json verified pieces of an unfinished download
    settings.json     rate limits and log level      address.json     the last run's address
    control.sock      the control socket (0600)      control-dir      where it is, for a deep home
    node.log          the node's log                 node.out         a detached node's output
    crash.log         the CLI's tracebacks           bootstrap.json   a bootstrap node's DHT state

Every module that reads or writes one of these takes a ``Home`` and asks it for the path,
so this list is the whole of the state directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Home"]


@dataclass(frozen=True, slots=True)
class Home:
    """The state directory ``root`` (``--home``) and the path of each file in it."""

    root: Path

    @property
    def identity(self) -> Path:
        return self.root / "identity.json"

    @property
    def dht(self) -> Path:
        return self.root / "dht.json"

    @property
    def groups(self) -> Path:
        return self.root / "groups.json"

    @property
    def shares(self) -> Path:
        return self.root / "shares.json"

    @property
    def hashes_dir(self) -> Path:
        return self.root / "hashes"

    def hashes(self, content_id: bytes) -> Path:
        """The piece hashes of the share ``content_id``."""
        return self.hashes_dir / content_id.hex()

    @property
    def downloads(self) -> Path:
        return self.root / "downloads.json"

    @property
    def resume_dir(self) -> Path:
        return self.root / "resume"

    def resume(self, content_id: bytes) -> Path:
        """The resume state (verified pieces) of the unfinished download ``content_id``."""
        return self.resume_dir / f"{content_id.hex()}.json"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def address(self) -> Path:
        return self.root / "address.json"

    @property
    def control_socket(self) -> Path:
        """Where the control socket is, unless that path is too long for a Unix socket
        (then ``control_pointer`` names the private directory holding it)."""
        return self.root / "control.sock"

    @property
    def control_pointer(self) -> Path:
        return self.root / "control-dir"

    @property
    def node_log(self) -> Path:
        return self.root / "node.log"

    @property
    def node_out(self) -> Path:
        return self.root / "node.out"

    @property
    def crash_log(self) -> Path:
        return self.root / "crash.log"

    @property
    def bootstrap(self) -> Path:
        """A bootstrap node's DHT id and contacts (``dhtshare bootstrap --state DIR``)."""
        return self.root / "bootstrap.json"

    @property
    def held_records(self) -> Path:
        """The DHT records this node stored for others, kept across a restart."""
        return self.root / "records.bin"
