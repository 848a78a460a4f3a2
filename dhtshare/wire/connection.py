"""``PeerConnection``: the sans-I/O peer protocol state machine.

Bytes in with ``receive_data`` (``b""`` is end of stream), events out with
``next_event`` (``None``: needs more data), bytes to write from ``send`` and
``data_to_send``. No sockets, no clock; ``transfer/aio/peer.py`` drives it.

Every state change goes through ``TRANSITIONS``, one table keyed by
``(role, state)`` and then by ``Input``. Rules:

1. An input missing from the table is refused with one error: a
   ``RemoteProtocolError`` for something the peer sent, a ``LocalProtocolError``
   for something we tried to send.
2. Once ``CLOSED`` (we sent or received a Reject, saw EOF, or called ``close``),
   incoming bytes are discarded unread and nothing more may be sent.
3. After a ``RemoteProtocolError`` the state is ``ERROR``: ``next_event`` raises the
   same error again, and the only thing we may still send is a ``Reject``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import TypeAlias

import nacl.signing

from dhtshare import crypto
from dhtshare.errors import LocalProtocolError, RemoteProtocolError
from dhtshare.wire.frames import (
    FRAME_HEADER_SIZE,
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    FrameDecoder,
    FrameType,
    Reason,
    encode_frame,
)
from dhtshare.wire.handshake import (
    AccessKeys,
    ClientHandshake,
    ServerHandshake,
    SessionCipher,
)
from dhtshare.wire.messages import Message, Reject, decode_message, encode_message
from dhtshare.wire.suites import Suite

__all__ = [
    "TRANSITIONS",
    "ConnectionClosed",
    "Event",
    "HandshakeComplete",
    "Input",
    "PeerConnection",
    "Role",
    "State",
]


_SCRATCH = 64 * 1024
"""Size of the buffer that receives (and drops) input after the connection closed."""
HANDSHAKE_READ = FRAME_HEADER_SIZE + MAX_HANDSHAKE_FRAME
"""Most room offered to one read before the session keys: a connection that has not
authenticated holds a buffer of a few hundred bytes, whatever size its reader asks."""


class Role(Enum):
    CLIENT = auto()
    SERVER = auto()


class State(Enum):
    IDLE = auto()  # client, before initiate()
    HELLO_SENT = auto()  # client, waiting for the ServerHello
    AWAIT_HELLO = auto()  # server, waiting for the ClientHello
    AWAIT_AUTH = auto()  # server, ServerHello sent, waiting for the ClientAuth
    OPEN = auto()  # handshake done: sealed messages both ways
    CLOSED = auto()
    ERROR = auto()


class Input(Enum):
    SEND_HELLO = auto()
    SEND_MESSAGE = auto()
    SEND_REJECT = auto()
    RECV_CLIENT_HELLO = auto()
    RECV_SERVER_HELLO = auto()
    RECV_CLIENT_AUTH = auto()
    RECV_SEALED = auto()
    RECV_PLAIN_REJECT = auto()  # a plaintext Reject frame (only before session keys)
    RECV_REJECT = auto()  # a sealed frame that holds a Reject
    RECV_EOF = auto()


_CLIENT, _SERVER = Role.CLIENT, Role.SERVER
_OPEN = {
    Input.SEND_MESSAGE: State.OPEN,
    Input.SEND_REJECT: State.CLOSED,
    Input.RECV_SEALED: State.OPEN,
    Input.RECV_REJECT: State.CLOSED,
    Input.RECV_EOF: State.CLOSED,
}
_CLOSED: dict[Input, State] = {}  # rule 2: input is discarded before any lookup
_ERROR = {Input.SEND_REJECT: State.CLOSED}

TRANSITIONS: dict[tuple[Role, State], dict[Input, State]] = {
    (_CLIENT, State.IDLE): {Input.SEND_HELLO: State.HELLO_SENT},
    (_CLIENT, State.HELLO_SENT): {
        Input.RECV_SERVER_HELLO: State.OPEN,
        Input.RECV_PLAIN_REJECT: State.CLOSED,
        Input.SEND_REJECT: State.CLOSED,
        Input.RECV_EOF: State.CLOSED,
    },
    (_SERVER, State.AWAIT_HELLO): {
        Input.RECV_CLIENT_HELLO: State.AWAIT_AUTH,
        Input.SEND_REJECT: State.CLOSED,
        Input.RECV_EOF: State.CLOSED,
    },
    (_SERVER, State.AWAIT_AUTH): {
        Input.RECV_CLIENT_AUTH: State.OPEN,
        Input.RECV_PLAIN_REJECT: State.CLOSED,
        Input.SEND_REJECT: State.CLOSED,
        Input.RECV_EOF: State.CLOSED,
    },
    (_CLIENT, State.OPEN): _OPEN,
    (_SERVER, State.OPEN): _OPEN,
    (_CLIENT, State.CLOSED): _CLOSED,
    (_SERVER, State.CLOSED): _CLOSED,
    (_CLIENT, State.ERROR): _ERROR,
    (_SERVER, State.ERROR): _ERROR,
}
"""Allowed inputs per (role, state) and the state each leads to."""

_FRAME_INPUT: dict[int, Input] = {
    FrameType.CLIENT_HELLO: Input.RECV_CLIENT_HELLO,
    FrameType.SERVER_HELLO: Input.RECV_SERVER_HELLO,
    FrameType.CLIENT_AUTH: Input.RECV_CLIENT_AUTH,
    FrameType.SEALED: Input.RECV_SEALED,
    FrameType.REJECT: Input.RECV_PLAIN_REJECT,
}


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The peer proved it holds ``peer_key``; the session is encrypted from here on.

    The server learns ``group_id`` and ``content_id`` from the client's (sealed)
    ClientAuth, and the group is the one whose access key the ClientHello proved; the
    client gets its own back. The adapter decides membership and may answer with a Reject.
    """

    peer_key: bytes
    group_id: bytes
    content_id: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its end of the stream cleanly (at a frame boundary)."""


Event: TypeAlias = HandshakeComplete | ConnectionClosed | Message


class PeerConnection:
    """One side of a peer connection, without I/O.

    Drive it like this: write ``initiate()`` (client only); then for every read,
    ``receive_data(data)`` (or receive into ``get_buffer`` and call
    ``buffer_updated``), call ``next_event()`` until it returns ``None``, and write
    ``data_to_send()`` (handshake replies that receiving produced). ``send(msg)``
    returns the bytes for ``msg``, preceded by any handshake bytes still queued.

    A client names the ``group_id`` and ``content_id`` it wants and holds that group's
    current ``access_key``; a server takes ``access_keys`` (asked at the ClientHello:
    group id -> access key of every group it serves). See ``wire/handshake.py``.
    """

    def __init__(
        self,
        role: Role,
        identity: nacl.signing.SigningKey,
        *,
        group_id: bytes | None = None,
        content_id: bytes | None = None,
        access_key: bytes | None = None,
        access_keys: AccessKeys | None = None,
        suites: frozenset[Suite] | None = None,
    ) -> None:
        self._role = role
        self._decoder = FrameDecoder(MAX_HANDSHAKE_FRAME)  # raised once the session is open
        self._pending: list[bytes] = []
        self._cipher: SessionCipher | None = None
        self._error: RemoteProtocolError | None = None
        self._eof = False
        self._client: ClientHandshake | None = None
        self._server: ServerHandshake | None = None
        if role is Role.CLIENT:
            if group_id is None or content_id is None or access_key is None:
                raise ValueError("a client needs group_id, content_id and access_key")
            if access_keys is not None:
                raise ValueError("access_keys are a server's (a client has one access_key)")
            if len(group_id) != crypto.HASH_SIZE or len(content_id) != crypto.HASH_SIZE:
                raise ValueError(f"group_id and content_id must be {crypto.HASH_SIZE} bytes")
            self._client = ClientHandshake(identity, access_key, group_id, content_id, suites)
            self._state = State.IDLE
        else:
            if group_id is not None or content_id is not None or access_key is not None:
                raise ValueError("a server learns group_id and content_id from the client")
            if access_keys is None:
                raise ValueError("a server needs access_keys (the groups it serves)")
            self._server = ServerHandshake(identity, access_keys, suites)
            self._state = State.AWAIT_HELLO

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> State:
        return self._state

    @property
    def suite(self) -> Suite | None:
        """The cipher suite sealing frames (``None`` before the session keys)."""
        return None if self._cipher is None else self._cipher.suite

    def _next_state(self, what: Input) -> State:
        new = TRANSITIONS[self._role, self._state].get(what)
        if new is not None:
            return new
        text = f"{what.name} not allowed for {self._role.name} in state {self._state.name}"
        if what.name.startswith("RECV_"):
            raise RemoteProtocolError(text, Reason.PROTOCOL)
        raise LocalProtocolError(text)

    # -- sending ---------------------------------------------------------------

    def initiate(self) -> bytes:
        """The ClientHello frame: the first bytes a client writes."""
        new = self._next_state(Input.SEND_HELLO)
        assert self._client is not None  # only a client's table allows SEND_HELLO
        self._state = new
        return encode_frame(FrameType.CLIENT_HELLO, self._client.hello.encode())

    def send(self, msg: Message) -> bytes | bytearray:
        """The bytes to write for ``msg`` (after any queued handshake bytes).

        A Reject is allowed in every state but ``CLOSED`` and closes the
        connection; it is sealed if we have session keys and plaintext otherwise.
        """
        new = self._next_state(Input.SEND_REJECT if isinstance(msg, Reject) else Input.SEND_MESSAGE)
        plaintext = encode_message(msg)
        frame: bytes | bytearray
        if self._cipher is not None:
            frame = self._cipher.seal(plaintext)
        else:
            frame = encode_frame(FrameType.REJECT, plaintext)
        self._state = new
        if self._pending:
            return self.data_to_send() + frame
        return frame

    def data_to_send(self) -> bytes:
        """Handshake bytes that receiving produced and that the caller must write."""
        out = b"".join(self._pending)
        self._pending.clear()
        return out

    def close(self) -> None:
        """Stop: discard further input and refuse further sends."""
        self._state = State.CLOSED

    # -- receiving -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its end."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of stream")
            return
        if not data:
            self._eof = True
        elif self._state not in (State.CLOSED, State.ERROR):
            self._decoder.feed(data)

    def get_buffer(self, size: int) -> memoryview:
        """Room to receive at least ``size`` bytes into (then call ``buffer_updated``).

        Once the connection is closed, failed or at end of stream, the room is a
        scratch buffer: what lands there is discarded, as ``receive_data`` would.
        """
        if self._eof or self._state in (State.CLOSED, State.ERROR):
            return memoryview(bytearray(max(1, min(size, _SCRATCH))))
        if self._state is not State.OPEN:
            size = min(size, HANDSHAKE_READ)
        return self._decoder.get_buffer(size)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were received into the room from the last ``get_buffer``."""
        if self._eof or self._state in (State.CLOSED, State.ERROR):
            return
        self._decoder.buffer_updated(nbytes)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return self._decoder.buffered

    def next_event(self) -> Event | None:
        """The next event, or ``None`` if more data is needed."""
        if self._error is not None:
            raise self._error
        try:
            while self._state is not State.CLOSED:
                # only an authenticated peer may announce a large frame
                opened = self._state is State.OPEN
                self._decoder.max_frame = MAX_FRAME if opened else MAX_HANDSHAKE_FRAME
                frame = self._decoder.next_frame_view()
                if frame is None:
                    return self._at_end_of_input()
                with frame[1] as payload:  # a view into the receive buffer, released here
                    event = self._handle_frame(frame[0], payload)
                if event is not None:
                    return event
        except RemoteProtocolError as exc:
            self._error = exc
            self._state = State.ERROR
            raise
        return ConnectionClosed() if self._eof else None

    def _at_end_of_input(self) -> Event | None:
        if not self._eof:
            return None
        if self._decoder.buffered:
            raise RemoteProtocolError("end of stream inside a frame", Reason.TRUNCATED)
        self._state = self._next_state(Input.RECV_EOF)
        return ConnectionClosed()

    def _handle_frame(self, frame_type: int, payload: memoryview) -> Event | None:
        """One frame's event; a sealed payload is opened in place, others are copied."""
        what = _FRAME_INPUT.get(frame_type)
        if what is None:
            raise RemoteProtocolError(f"unknown frame type {frame_type}", Reason.PROTOCOL)
        self._state = self._next_state(what)
        if what is Input.RECV_SEALED:
            return self._on_message(self._open_cipher().open(payload))
        data = bytes(payload)  # handshake frames are small, and their parts are kept
        match what:
            case Input.RECV_CLIENT_HELLO:
                self._on_client_hello(data)
                return None
            case Input.RECV_SERVER_HELLO:
                return self._on_server_hello(data)
            case Input.RECV_CLIENT_AUTH:
                return self._on_client_auth(data)
            case _:
                return self._on_plain_reject(data)

    def _open_cipher(self) -> SessionCipher:
        if self._cipher is None:  # the table only allows RECV_SEALED once keys exist
            raise LocalProtocolError("sealed frame without session keys")
        return self._cipher

    def _on_client_hello(self, payload: bytes) -> None:
        assert self._server is not None
        reply = self._server.on_client_hello(payload)
        self._pending.append(encode_frame(FrameType.SERVER_HELLO, reply.encode()))

    def _on_server_hello(self, payload: bytes) -> HandshakeComplete:
        assert self._client is not None
        server, self._cipher, auth = self._client.on_server_hello(payload)
        self._pending.append(encode_frame(FrameType.CLIENT_AUTH, auth.encode()))
        client = self._client
        return HandshakeComplete(server.identity_key, client.group_id, client.content_id)

    def _on_client_auth(self, payload: bytes) -> HandshakeComplete:
        assert self._server is not None
        try:
            peer = self._server.on_client_auth(payload)
        finally:  # keys once the ClientAuth opened: until then a Reject goes in plaintext
            self._cipher = self._server.session
        return HandshakeComplete(peer.peer_key, peer.group_id, peer.content_id)

    def _on_message(self, plaintext: bytearray) -> Message:
        msg = decode_message(plaintext)
        if isinstance(msg, Reject):
            self._state = self._next_state(Input.RECV_REJECT)
        return msg

    def _on_plain_reject(self, payload: bytes) -> Reject:
        msg = decode_message(payload)
        if not isinstance(msg, Reject):
            raise RemoteProtocolError("plaintext frame is not a Reject", Reason.PROTOCOL)
        return msg
