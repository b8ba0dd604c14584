"""Peer authentication on hybrid-kv's side channels (both shells), before any address or NIXL metadata
is revealed.

With a shared secret (`HYBRID_KV_SECRET`, or the connector's `hybrid_kv_secret` key; the same on every
prefill and decode rank) each connection runs a mutual HMAC-SHA256 challenge:

    D -> P  hello {page fields, nonce_d, auth: true} (no NIXL metadata yet)
    P -> D  challenge {nonce_p, proof_p}            proof_p = HMAC(k, "prefill" | nonce_p | nonce_d)
    D -> P  auth {proof_d} (+ D's NIXL metadata)    proof_d = HMAC(k, "decode"  | nonce_d | nonce_p)
    P -> D  welcome {addresses, ...}                only now; or error, and the connection closes

Each side checks the other's proof before it sends anything the other could use; fresh nonces on both
sides make a recorded exchange useless, the role in the MAC stops a reflected one. Without a secret a
rank serves loopback only: binding the side channel to any other address is refused at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket

from hybrid_kv.staging import messages as M

SECRET_ENV = "HYBRID_KV_SECRET"
MIN_SECRET = 16  # characters
_NONCE_HEX = 32


class AuthError(PermissionError):
    """The peer is not authenticated (or refuses us): nothing of ours was revealed to it."""


def load_secret(value: str | None = None, environ=None) -> bytes | None:
    """`value` (a config key), else $HYBRID_KV_SECRET, else None; shorter than MIN_SECRET is refused."""
    env = os.environ if environ is None else environ
    raw = value if value else env.get(SECRET_ENV, "")
    if not raw:
        return None
    if not isinstance(raw, str) or len(raw) < MIN_SECRET:
        n = len(raw) if isinstance(raw, str) else type(raw).__name__
        raise ValueError(
            f"the hybrid-kv shared secret has {n} characters; use at least {MIN_SECRET} "
            "(for example the output of `openssl rand -hex 32`)"
        )
    return raw.encode()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost, or a name that resolves only to those ("" binds every address)."""
    if host == "localhost":
        return True
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_bind(host: str, secret: bytes | None, what: str) -> None:
    """Refuse to serve a non-loopback address without a shared secret."""
    if secret is None and not is_loopback(host):
        raise ValueError(
            f"{what} would listen on {host!r}, which is not a loopback address, without a shared secret: any "
            f"host that reaches it could learn this rank's registered addresses; set {SECRET_ENV} (the same "
            "on every prefill and decode rank) or bind to 127.0.0.1"
        )


def _proof(secret: bytes, role: str, own: str, other: str) -> str:
    return hmac.new(secret, f"hybrid-kv/1|{role}|{own}|{other}".encode(), hashlib.sha256).hexdigest()


def _nonce_ok(v) -> bool:
    return isinstance(v, str) and len(v) == _NONCE_HEX and all(c in "0123456789abcdef" for c in v)


class ClientAuth:
    """The decode side of one connection."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self.nonce = secrets.token_hex(_NONCE_HEX // 2)

    def answer(self, reply: dict, peer: str) -> dict | None:
        """After our hello: the `auth` message to send for a valid challenge, None for a welcome we may
        accept. Raises AuthError for a peer that failed (or skipped) authentication."""
        kind = reply.get("type")
        if kind == M.CHALLENGE:
            if self.secret is None:
                raise AuthError(f"{peer} requires the shared secret: set {SECRET_ENV} here as on the prefill ranks")
            n = reply.get("nonce")
            if not _nonce_ok(n) or not hmac.compare_digest(
                str(reply.get("proof")), _proof(self.secret, "prefill", n, self.nonce)
            ):
                raise AuthError(f"{peer} failed authentication (its {SECRET_ENV} differs); nothing was sent to it")
            return {"type": M.AUTH, "proof": _proof(self.secret, "decode", self.nonce, n)}
        if kind == M.WELCOME and self.secret is not None:
            raise AuthError(
                f"{peer} answered without authenticating (it has no {SECRET_ENV}); its addresses are not used"
            )
        return None


class ServerAuth:
    """The prefill side of one connection: `challenge` for a hello, then `check` of the `auth`."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self._expect: str | None = None

    @property
    def required(self) -> bool:
        return self.secret is not None

    def challenge(self, hello: dict) -> dict:
        assert self.secret is not None
        n_d = hello.get("nonce")
        if not _nonce_ok(n_d):
            raise AuthError(f"this prefill rank requires the shared secret ({SECRET_ENV}); the hello carried none")
        n_p = secrets.token_hex(_NONCE_HEX // 2)
        self._expect = _proof(self.secret, "decode", n_d, n_p)
        return {"type": M.CHALLENGE, "nonce": n_p, "proof": _proof(self.secret, "prefill", n_p, n_d)}

    def check(self, auth: dict) -> None:
        want, self._expect = self._expect, None  # one try per challenge
        if want is None:
            raise AuthError("auth without a challenge")
        if not hmac.compare_digest(str(auth.get("proof"))[:128], want):
            raise AuthError(f"authentication failed: the decode rank's {SECRET_ENV} differs")
