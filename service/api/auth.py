"""Who is calling: credentials to an :class:`Identity` with roles (what each role may call is the table
``service.api.errors.ALLOWED_ROLES``).

Three sources of credentials, from ``service.settings.Settings``:

- ``auth_tokens_file``: scoped credentials, one per line, ``<roles> <name> <credential>`` (the format is
  documented at ``Settings.auth_tokens_file``). Bearer tokens are stored as SHA-256 digests, never in clear;
  a presented token is hashed and compared with EVERY stored digest in constant time (``hmac.compare_digest``
  over digests of equal length, no early exit), so neither the comparison nor the number of comparisons
  depends on which token matched. Several lines may name the same identity (rotation). ``x509-cn:<CN>`` lines
  map a mutual-TLS client certificate's subject common name to an identity. The file is re-read when it
  changes (checked at most once a second), so rotating a token needs no restart.
- ``auth_token``: one token with every role (the embedded mode's credential), identity ``token``.
- Neither: no authentication (embedded, local only): every caller is ``anonymous`` (or, over mutual TLS,
  ``x509:<CN>``) with every role.

Bearer tokens travel as ``authorization: Bearer <token>``; the scheme is case-insensitive (RFC 7235
section 2.1). A call with a token that does not match is refused even if its certificate would map to an
identity: a wrong credential is never silently replaced by another.

Refusals are :class:`service.domain.Unauthenticated` with one fixed message that says nothing about why
(absent, malformed, unknown and expired tokens look the same to the caller).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.audit import keyed_hash
from service.domain import Role, Unauthenticated

log = logging.getLogger(__name__)

TOKEN_PREFIX = "sha256:"
CN_PREFIX = "x509-cn:"
RELOAD_CHECK_S = 1.0  # how often the credentials file's stat is compared (a stat per call would also do)
REFUSAL = "missing or invalid credentials"


@dataclass(frozen=True)
class Identity:
    """An authenticated caller. ``hash`` (keyed with the subject hash key, so the same on every replica) is
    stored on the requests it submits; a submitter reads only requests carrying its hash."""

    name: str
    roles: frozenset[Role]
    hash: str

    @property
    def reads_everything(self) -> bool:
        return bool(self.roles & {Role.AUDITOR, Role.OPERATOR})


@dataclass(frozen=True)
class _Entry:
    name: str
    roles: frozenset[Role]


@dataclass(frozen=True)
class Credentials:
    """The parsed credentials file: token digests and certificate common names, each to an identity."""

    tokens: tuple[tuple[bytes, _Entry], ...] = ()
    common_names: Mapping[str, _Entry] | None = None


def parse_credentials(text: str, source: str = "credentials file") -> Credentials:
    """Parse the ``auth_tokens_file`` format; a bad line is a ValueError naming its line number (never its
    content: it may hold a token someone pasted by mistake)."""
    tokens: dict[bytes, _Entry] = {}
    common_names: dict[str, _Entry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) != 3:
            raise ValueError(f"{source} line {number}: expected '<roles> <name> <credential>'")
        role_text, name, credential = parts
        try:
            roles = frozenset(Role(role) for role in role_text.split(","))
        except ValueError:
            raise ValueError(f"{source} line {number}: roles are a comma-separated list of "
                             f"{', '.join(r.value for r in Role)}") from None
        if not name.isprintable():
            raise ValueError(f"{source} line {number}: the name must be printable")
        entry = _Entry(name, roles)
        if credential.startswith(TOKEN_PREFIX):
            digest_hex = credential[len(TOKEN_PREFIX):].strip().lower()
            if len(digest_hex) != 64 or any(c not in "0123456789abcdef" for c in digest_hex):
                raise ValueError(f"{source} line {number}: {TOKEN_PREFIX} needs the 64 hex digits of a SHA-256")
            digest = bytes.fromhex(digest_hex)
            if digest in tokens and tokens[digest] != entry:
                raise ValueError(f"{source} line {number}: this token already belongs to another identity")
            tokens[digest] = entry
        elif credential.startswith(CN_PREFIX):
            common_name = credential[len(CN_PREFIX):].strip()
            if not common_name:
                raise ValueError(f"{source} line {number}: {CN_PREFIX} needs a common name")
            if common_name in common_names and common_names[common_name] != entry:
                raise ValueError(f"{source} line {number}: this common name already belongs to another identity")
            common_names[common_name] = entry
        else:
            raise ValueError(f"{source} line {number}: the credential is {TOKEN_PREFIX}<hex> or {CN_PREFIX}<name>")
    return Credentials(tuple(tokens.items()), common_names)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe (a token68 of RFC 7235)."""
    return secrets.token_urlsafe(32)


def credentials_line(roles: Iterable[Role], name: str, token: str) -> str:
    """The ``auth_tokens_file`` line for ``token`` (only its digest is written)."""
    return f"{','.join(sorted(r.value for r in roles))} {name} {TOKEN_PREFIX}{token_digest(token).hex()}"


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's ``authorization`` header; None when the header is absent. Raises
    Unauthenticated for a header that is not one ``Bearer <token>`` (any case of ``Bearer``)."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated(REFUSAL)
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthenticated(REFUSAL)
    return token


class Authenticator:
    """Turns a call's metadata and TLS peer into an :class:`Identity`, or raises Unauthenticated."""

    def __init__(self, auth_token: str | None, tokens_file: Path | None, identity_key: bytes):
        self._identity_key = identity_key
        self._single = token_digest(auth_token) if auth_token else None
        self._tokens_file = tokens_file
        self._lock = threading.Lock()
        self._credentials = Credentials((), {})
        self._file_state: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        if tokens_file is not None:
            self._reload(force=True)  # a missing or bad file is a start-up error

    @property
    def required(self) -> bool:
        """True when callers must present a credential (otherwise everyone has every role)."""
        return self._single is not None or self._tokens_file is not None

    def identity(self, name: str, roles: frozenset[Role]) -> Identity:
        return Identity(name, roles, keyed_hash(self._identity_key, "identity", name))

    def authenticate(self, metadata, auth_context: Mapping[str, Sequence[bytes]] | None) -> Identity:
        token = bearer_token(metadata)  # a malformed header is refused even in the open mode
        common_name = _common_name(auth_context)
        if not self.required:
            return self.identity(f"x509:{common_name}" if common_name else "anonymous", frozenset(Role))
        if token is not None:
            entry = self._match_token(token)
            if entry is None:
                raise Unauthenticated(REFUSAL)
            return self.identity(entry.name, entry.roles)
        if common_name is not None:
            self._reload()
            entry = (self._credentials.common_names or {}).get(common_name)
            if entry is not None:
                return self.identity(entry.name, entry.roles)
        raise Unauthenticated(REFUSAL)

    def _match_token(self, token: str) -> _Entry | None:
        presented = token_digest(token)
        found: _Entry | None = None
        if self._single is not None and hmac.compare_digest(presented, self._single):
            found = _Entry("token", frozenset(Role))
        self._reload()
        for digest, entry in self._credentials.tokens:  # every digest is compared: no early exit
            if hmac.compare_digest(presented, digest) and found is None:
                found = entry
        return found

    def _reload(self, force: bool = False) -> None:
        """Re-read the credentials file when its size, mtime or inode changed (cert-manager and Kubernetes
        Secrets swap a symbolic link, which changes the inode). A file that became unreadable or invalid
        keeps the previous credentials and logs an error, so a bad edit never locks everyone out."""
        if self._tokens_file is None:
            return
        now = time.monotonic()
        if not force and now - self._checked_at < RELOAD_CHECK_S:
            return
        with self._lock:
            if not force and now - self._checked_at < RELOAD_CHECK_S:
                return
            self._checked_at = now
            try:
                stat = os.stat(self._tokens_file)
                state = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                if state == self._file_state and not force:
                    return
                credentials = parse_credentials(Path(self._tokens_file).read_text(), "LETHE_AUTH_TOKENS_FILE")
            except (OSError, ValueError, UnicodeDecodeError) as error:
                if force:
                    raise ValueError(f"cannot load LETHE_AUTH_TOKENS_FILE: {error}") from None
                log.error("LETHE_AUTH_TOKENS_FILE not reloaded, keeping the previous credentials: %s", error)
                return
            self._credentials, self._file_state = credentials, state
            log.info("credentials loaded: %d token(s), %d certificate name(s)", len(credentials.tokens),
                     len(credentials.common_names or {}))


def _common_name(auth_context: Mapping[str, Sequence[bytes]] | None) -> str | None:
    """The subject CN of a verified client certificate (gRPC fills ``x509_common_name`` only for a peer
    certificate that passed verification against ``tls_client_ca``)."""
    if not auth_context:
        return None
    names = auth_context.get("x509_common_name") or ()
    if not names:
        return None
    value = names[0]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
