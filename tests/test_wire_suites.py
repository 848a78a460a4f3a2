"""The AEADs seal into and open from caller-owned buffers, byte for byte as PyNaCl does."""

from __future__ import annotations

import os

import nacl.exceptions
import pytest

from dhtshare.wire import suites
from dhtshare.wire.frames import FrameDecoder, encode_frame
from dhtshare.wire.suites import AEADS, Aead, Suite

AD = b"\x00\x00\x01\x00\x04"
MESSAGE = os.urandom(70_000)


def keys(aead: Aead) -> tuple[bytes, bytes]:
    return os.urandom(aead.key_size), os.urandom(aead.nonce_size)


def test_libsodium_c_functions_are_in_use() -> None:
    # A PyNaCl without its cffi module would still work, through copies; say so loudly.
    assert suites.FAST_AEAD


@pytest.fixture(params=["c-buffers", "public-api"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through libsodium's C functions, then through PyNaCl's public API."""
    if request.param == "public-api":
        monkeypatch.setattr(suites, "_c_function", lambda name, op: None)
    return str(request.param)


@pytest.mark.parametrize("suite", list(Suite))
def test_seal_and_open_match_pynacl(suite: Suite, path: str) -> None:
    aead = AEADS[suite]
    key, nonce = keys(aead)
    expected = aead.encrypt(MESSAGE, AD, nonce, key)
    # the message is a view into a bigger buffer, as a block read for sending can be
    source = bytearray(7) + MESSAGE + bytearray(9)
    out = bytearray(len(MESSAGE) + aead.tag_size)
    with memoryview(source) as view:
        aead.seal_into(out, view[7 : 7 + len(MESSAGE)], AD, nonce, key)
    assert bytes(out) == expected
    # the sealed bytes are a view into a receive buffer, as the frame decoder hands out
    received = bytearray(3) + expected
    with memoryview(received) as view:
        plain = aead.open_new(view[3:], AD, nonce, key)
    assert isinstance(plain, bytearray)
    assert plain == MESSAGE


@pytest.mark.parametrize("suite", list(Suite))
def test_tampered_or_short_input_does_not_open(suite: Suite, path: str) -> None:
    aead = AEADS[suite]
    key, nonce = keys(aead)
    sealed = bytearray(aead.encrypt(b"block", AD, nonce, key))
    sealed[2] ^= 1
    with pytest.raises(nacl.exceptions.CryptoError):
        aead.open_new(sealed, AD, nonce, key)
    sealed[2] ^= 1
    with pytest.raises(nacl.exceptions.CryptoError):
        aead.open_new(sealed, AD[:-1], nonce, key)  # other associated data
    with pytest.raises(nacl.exceptions.CryptoError):
        aead.open_new(sealed[: aead.tag_size - 1], AD, nonce, key)
    assert aead.open_new(sealed, AD, nonce, key) == b"block"


@pytest.mark.parametrize("suite", list(Suite))
def test_views_of_wider_items_count_in_bytes(suite: Suite, path: str) -> None:
    aead = AEADS[suite]
    key, nonce = keys(aead)
    message = os.urandom(64)
    out = bytearray(64 + aead.tag_size)
    with memoryview(message) as view, view.cast("I") as words:  # 16 items, 64 bytes
        aead.seal_into(out, words, AD, nonce, key)
    assert bytes(out) == aead.encrypt(message, AD, nonce, key)


@pytest.mark.parametrize("suite", list(Suite))
def test_wrong_key_or_nonce_size_is_refused(suite: Suite, path: str) -> None:
    aead = AEADS[suite]
    key, nonce = keys(aead)
    sealed = aead.encrypt(b"block", AD, nonce, key)
    out = bytearray(5 + aead.tag_size)
    for bad_nonce, bad_key in ((nonce[:4], key), (nonce, key[:3]), (nonce + b"!", key)):
        with pytest.raises(ValueError, match="nonce"):
            aead.seal_into(out, b"block", AD, bad_nonce, bad_key)
        with pytest.raises(ValueError, match="nonce"):
            aead.open_new(sealed, AD, bad_nonce, bad_key)


def test_seal_into_wants_room_for_exactly_message_and_tag() -> None:
    aead = AEADS[Suite.CHACHA20_POLY1305]
    key, nonce = keys(aead)
    for size in (aead.tag_size + 4, aead.tag_size + 6):
        with pytest.raises(ValueError, match="message plus the tag"):
            aead.seal_into(bytearray(size), b"hello", AD, nonce, key)


def test_frame_view_is_the_payload_without_a_copy() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(4, b"first") + encode_frame(4, b"second")[:3])
    frame = dec.next_frame_view()
    assert frame is not None
    kind, view = frame
    assert (kind, bytes(view)) == (4, b"first")
    assert view.obj is dec._buf  # a window on the receive buffer itself
    view.release()
    assert dec.next_frame_view() is None  # the second frame is incomplete
    dec.feed(encode_frame(4, b"second")[3:])
    assert dec.next_frame() == (4, b"second")
