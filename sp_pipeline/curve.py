"""CURVE security for a tcp:// ingest endpoint.

The writer's ingest socket becomes a CURVE server when ``ingest_curve_secret_key`` is
set: traffic is encrypted and a producer must know the server's public key to connect.
With ``ingest_curve_client_keys`` (a file of Z85 public keys, one per line, lines
starting with ``#`` ignored) only those producers are let in; the check runs in a ZAP handler
thread (pyzmq's ThreadAuthenticator) inside the writer.

``sp-pipeline curve-keypair`` prints a new key pair.
"""

from __future__ import annotations

import logging
from typing import FrozenSet, Optional

import zmq

from .errors import ConfigError

log = logging.getLogger("sp_pipeline.curve")

Z85_KEY_LENGTH = 40
_Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def keypair() -> tuple:
    """A new (public, secret) pair of Z85 key strings."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def public_key(secret_key: str) -> str:
    """The Z85 public key of a Z85 secret key."""
    return zmq.curve_public(secret_key.encode("ascii")).decode("ascii")


def read_client_keys(path: str) -> FrozenSet[bytes]:
    """Allowed producer keys from ``path``; ConfigError naming the line when one is bad."""
    keys = set()
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"ingest_curve_client_keys: cannot read {path} ({exc.strerror})") from None
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key:
            continue
        is_key = len(key) == Z85_KEY_LENGTH and all(c in _Z85 for c in key)
        if not is_key and key.startswith("#"):  # a comment ('#' is also a Z85 digit)
            continue
        if not is_key:
            raise ConfigError(f"ingest_curve_client_keys: {path} line {number}: a Z85 public "
                              f"key has {Z85_KEY_LENGTH} characters of the Z85 alphabet")
        keys.add(key.encode("ascii"))
    return frozenset(keys)


class _AllowList:
    def __init__(self, keys: FrozenSet[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            log.warning("refused a producer whose CURVE key is not allowed")
        return allowed


def secure_server(ctx: zmq.Context, sock: zmq.Socket, secret_key: str,
                  client_keys_path: str = "") -> Optional[object]:
    """Make ``sock`` a CURVE server; with a client key file, start the authenticator
    (returned, to be stopped by the caller) that admits only those keys."""
    authenticator = None
    if client_keys_path:
        from zmq.auth.thread import ThreadAuthenticator

        keys = read_client_keys(client_keys_path)
        authenticator = ThreadAuthenticator(ctx, log=log)
        authenticator.start()
        authenticator.configure_curve_callback(domain="*", credentials_provider=_AllowList(keys))
    sock.curve_secretkey = secret_key.encode("ascii")
    sock.curve_publickey = public_key(secret_key).encode("ascii")
    sock.curve_server = True
    return authenticator
