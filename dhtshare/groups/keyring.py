"""What a node keeps secret about each group (pure state, persisted as JSON by the node).

Per group: the epochs whose secret I hold (the current one and a few before it, so records
of the previous epoch still open during a change), the invite (the owner's current one, or
the one I joined with), my mailbox secret while I ask to join, and as owner the mailbox
secret of each requester. ``Where`` names a space by role, resolved against this state at
the moment a record is sealed, so a record republished after an epoch change moves to the
new epoch's keys by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dhtshare.groups.secrets import Invite, Space, access_key, epoch_space, mailbox

__all__ = ["KEEP_EPOCHS", "GroupKeys", "Keyring", "Where", "keyring_from_json", "keyring_to_json"]

KEEP_EPOCHS = 8  # epoch secrets kept per group (the current one and the ones before it)
GRACE = 600.0  # seconds the previous epoch is still read after a change (20 maintenance
# rounds: every member online moves its records within one)


@dataclass
class GroupKeys:
    """The secrets of one group that this node holds."""

    epoch: int = -1  # -1: no epoch secret yet (a requester)
    secrets: dict[int, bytes] = field(default_factory=dict)
    invite: str = ""  # token: the owner's current invite, or the one I joined with
    reply: bytes = b""  # my mailbox secret, while I ask to join (and after: grants)
    replies: dict[bytes, bytes] = field(default_factory=dict)  # owner: requester -> mailbox
    rejected: dict[bytes, int] = field(default_factory=dict)  # owner: requester -> when
    retired: list[str] = field(default_factory=list)  # owner: invites rotated away
    carried: dict[bytes, int] = field(default_factory=dict)  # their requests still pending
    removed: bool = False  # an epoch change left me out: I was removed
    changed_at: float = 0.0  # when I moved to the current epoch (unix time)
    owner: bytes = b""  # the owner of the last roster I verified (announces epochs)
    #: as owner: who received each epoch's secret (to announce it again after a restart)
    announced: dict[int, list[bytes]] = field(default_factory=dict)

    def install(self, epoch: int, secret: bytes, *, at: float = 0.0) -> bool:
        """Hold ``secret`` for ``epoch`` (learnt at ``at``); True if it is newer than the
        current one."""
        self.secrets[epoch] = secret
        for old in sorted(self.secrets)[:-KEEP_EPOCHS]:
            del self.secrets[old]
        for old in [e for e in self.announced if e - 1 not in self.secrets]:
            del self.announced[old]
        if epoch > self.epoch:
            self.epoch = epoch
            self.removed = False
            self.changed_at = at
            return True
        return False

    def space(self, epoch: int | None = None) -> Space | None:
        """The space of ``epoch`` (default: the current one), if I hold its secret."""
        secret = self.secrets.get(self.epoch if epoch is None else epoch)
        return None if secret is None else epoch_space(secret)

    def read_spaces(self, now: float) -> list[Space]:
        """Where members' records are read: the current epoch, and for ``GRACE`` seconds
        after a change the previous one too (its records stay readable until their signers,
        who move them as they learn of the change, have republished them)."""
        spaces = [self.space()]
        if now - self.changed_at < GRACE:
            spaces.append(self.space(self.epoch - 1))
        return [s for s in spaces if s is not None]

    @property
    def access_key(self) -> bytes | None:
        secret = self.secrets.get(self.epoch)
        return None if secret is None else access_key(secret)

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "secrets": {str(n): s.hex() for n, s in self.secrets.items()},
            "invite": self.invite,
            "reply": self.reply.hex(),
            "replies": {k.hex(): v.hex() for k, v in self.replies.items()},
            "rejected": {k.hex(): t for k, t in self.rejected.items()},
            "retired": list(self.retired),
            "carried": {k.hex(): t for k, t in self.carried.items()},
            "removed": self.removed,
            "changed_at": self.changed_at,
            "owner": self.owner.hex(),
            "announced": {str(e): [k.hex() for k in ks] for e, ks in self.announced.items()},
        }

    @classmethod
    def from_json(cls, doc: Any) -> GroupKeys:
        return cls(
            int(doc["epoch"]),
            {int(n): bytes.fromhex(s) for n, s in doc["secrets"].items()},
            str(doc["invite"]),
            bytes.fromhex(doc["reply"]),
            {bytes.fromhex(k): bytes.fromhex(v) for k, v in doc["replies"].items()},
            {bytes.fromhex(k): int(t) for k, t in doc.get("rejected", {}).items()},
            [str(token) for token in doc.get("retired", [])],
            {bytes.fromhex(k): int(t) for k, t in doc.get("carried", {}).items()},
            bool(doc["removed"]),
            float(doc.get("changed_at", 0.0)),
            bytes.fromhex(doc.get("owner", "")),
            {int(e): [bytes.fromhex(k) for k in ks] for e, ks in doc.get("announced", {}).items()},
        )


Keyring = dict[bytes, GroupKeys]


def keyring_to_json(ring: Keyring) -> dict[str, Any]:
    return {g.hex(): k.to_json() for g, k in ring.items()}


def keyring_from_json(doc: Any) -> Keyring:
    return {bytes.fromhex(g): GroupKeys.from_json(k) for g, k in doc.items()}


@dataclass(frozen=True, slots=True)
class Where:
    """A space named by role: ``epoch`` (the current epoch, or epoch ``at``), ``inbox``
    (the invite's), ``mailbox`` (``requester``'s; mine when ``requester`` is empty)."""

    role: Literal["epoch", "inbox", "mailbox"]
    group_id: bytes
    at: int | None = None
    requester: bytes = b""

    def resolve(self, ring: Keyring) -> Space | None:
        """The space this names now, or ``None`` when I hold no secret for it."""
        keys = ring.get(self.group_id)
        if keys is None:
            return None
        if self.role == "epoch":
            return keys.space(self.at)
        if self.role == "inbox":
            return Invite.parse(keys.invite).space if keys.invite else None
        reply = keys.replies.get(self.requester) if self.requester else keys.reply
        return mailbox(reply) if reply else None
