"""The mc1 ciphertext format outside the database, for a program that holds
a raw 32-byte key (the README's "Ciphertext format, version 1").

Envelope: 0x01 | key id (u32 big-endian) | nonce (12) | ciphertext | tag (16);
GCM associated data = envelope[0:5] + the caller's AAD (empty when None);
text form "mc1:" + standard padded base64. What these functions write,
`manna_crypt.decrypt_gcm(c, key bytea, aad)` reads, and the other way round.

Keyring values (key id > 0) are opened the same way by whoever holds that
data key's raw bytes — which, by design, no program outside the database
does: keyring keys never leave it. These functions are for values sealed
under raw keys (key id 0), for tests and for interoperability.

Needs the `cryptography` package (extra: manna-crypt[cryptography]).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Optional, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "PREFIX",
    "DecryptionFailed",
    "MalformedCiphertext",
    "mc1_encrypt",
    "mc1_decrypt",
    "mc1_encrypt_bytes",
    "mc1_decrypt_bytes",
    "key_id",
]

PREFIX = "mc1:"
VERSION = 1
HEADER_LEN, NONCE_LEN, TAG_LEN = 5, 12, 16
OVERHEAD = HEADER_LEN + NONCE_LEN + TAG_LEN

Data = Union[str, bytes]


class MalformedCiphertext(ValueError):
    """Not a version-1 ciphertext (the database's 22P02)."""


class DecryptionFailed(ValueError):
    """Wrong key, wrong AAD or tampered data (the database's 39000)."""


def _bytes(value: Optional[Data]) -> bytes:
    if value is None:
        return b""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        # the length only: never the key
        raise ValueError(f"AES-256-GCM key must be 32 bytes, not {len(key)}")


def _header(kid: int) -> bytes:
    if not 0 <= kid <= 0xFFFFFFFF:
        raise ValueError("key id must fit in an unsigned 32-bit integer")
    return bytes([VERSION]) + kid.to_bytes(4, "big")


def mc1_encrypt_bytes(key: bytes, plaintext: Data, aad: Optional[Data] = None, key_id: int = 0) -> bytes:
    """The binary envelope (what the bytea forms of encrypt_gcm return)."""
    _check_key(key)
    header = _header(key_id)
    nonce = os.urandom(NONCE_LEN)
    return header + nonce + AESGCM(key).encrypt(nonce, _bytes(plaintext), header + _bytes(aad))


def mc1_encrypt(key: bytes, plaintext: Data, aad: Optional[Data] = None, key_id: int = 0) -> str:
    """The text form "mc1:…" (what encrypt_gcm(text, key bytea, aad) returns)."""
    return PREFIX + base64.b64encode(mc1_encrypt_bytes(key, plaintext, aad, key_id)).decode("ascii")


def _envelope(value: Union[str, bytes]) -> bytes:
    if isinstance(value, str):
        if not value.startswith(PREFIX):
            raise MalformedCiphertext('text ciphertext does not start with "mc1:"')
        try:
            env = base64.b64decode(value[len(PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise MalformedCiphertext("text ciphertext is not valid base64") from None
    else:
        env = bytes(value)
    if len(env) < OVERHEAD:
        raise MalformedCiphertext(f"envelope is {len(env)} bytes, shorter than its {OVERHEAD}-byte overhead")
    if env[0] != VERSION:
        raise MalformedCiphertext(f"unknown format version {env[0]}")
    return env


def mc1_decrypt_bytes(key: bytes, ciphertext: Union[str, bytes], aad: Optional[Data] = None) -> bytes:
    """Plaintext bytes of a text or binary envelope."""
    _check_key(key)
    env = _envelope(ciphertext)
    try:
        return AESGCM(key).decrypt(
            env[HEADER_LEN:HEADER_LEN + NONCE_LEN], env[HEADER_LEN + NONCE_LEN:], env[:HEADER_LEN] + _bytes(aad)
        )
    except InvalidTag:
        raise DecryptionFailed("decryption failed: wrong key or corrupt data") from None


def mc1_decrypt(key: bytes, ciphertext: Union[str, bytes], aad: Optional[Data] = None) -> str:
    """Plaintext text (UTF-8) of a text or binary envelope."""
    return mc1_decrypt_bytes(key, ciphertext, aad).decode("utf-8")


def key_id(ciphertext: Union[str, bytes]) -> int:
    """The key id in the header (0 = a raw key), as manna_crypt.key_id()."""
    return int.from_bytes(_envelope(ciphertext)[1:HEADER_LEN], "big")
