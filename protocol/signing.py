"""Ed25519 keys, signatures with key ids, and the trust store devices pin.

A key id is the first 16 hex digits of sha256(raw public key bytes). A signature travels as
a small JSON document ``{"alg": "ed25519", "key_id": ..., "signature": base64}`` (the
``manifest.sig`` member of a bundle, or the ``signature`` field of a signed command).

The trust store holds several public keys (rotation) and a list of revoked key ids; a
revoked id is refused even when its key is still listed. Keys have roles: a store is for
one role (``bundle`` keys sign bundle manifests offline, ``command`` keys are the fleet
server's online keys that sign commands) and knows the key ids of the other role, so a
key used in the wrong role is refused with ``key_wrong_role``, never accepted.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ProtocolError, ReasonCode, SignatureError


class Signature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    alg: str = "ed25519"
    key_id: str
    signature: str  # base64 of the 64 signature bytes

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise SignatureError(
                ReasonCode.SIGNATURE_INVALID,
                f"signature document is malformed: {exc.errors()[0]['msg']}",
            ) from None


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


@dataclass(frozen=True)
class KeyPair:
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return public_pem(self.public)

    def sign(self, data: bytes) -> Signature:
        sig = self.private.sign(data)
        return Signature(key_id=self.key_id, signature=base64.b64encode(sig).decode())

    def __repr__(self) -> str:  # never print key material
        return f"KeyPair(key_id={self.key_id!r})"


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(data: bytes) -> KeyPair:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProtocolError("private key is not Ed25519")
    return KeyPair(key)


def load_public_key(data: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ProtocolError("public key is not Ed25519")
    return key


def read_private_key(path: Path) -> KeyPair:
    return load_private_key(Path(path).read_bytes())


def read_public_key(path: Path) -> Ed25519PublicKey:
    return load_public_key(Path(path).read_bytes())


@dataclass
class TrustStore:
    """Pinned public keys by key id, and revoked key ids."""

    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    role: str = ""  # "bundle" or "command" (for messages); "" = unspecified
    other_role: set[str] = field(default_factory=set)  # key ids that belong to another role

    @classmethod
    def from_keys(
        cls,
        keys: Iterable[Ed25519PublicKey],
        revoked: Iterable[str] = (),
        *,
        role: str = "",
        other_role: Iterable[str] = (),
    ) -> TrustStore:
        return cls({key_id(k): k for k in keys}, set(revoked), role, set(other_role))

    @classmethod
    def from_files(
        cls,
        paths: Iterable[Path],
        revoked: Iterable[str] = (),
        *,
        role: str = "",
        other_role: Iterable[str] = (),
    ) -> TrustStore:
        return cls.from_keys(
            [read_public_key(Path(p)) for p in paths], revoked, role=role, other_role=other_role
        )

    def add(self, key: Ed25519PublicKey) -> str:
        kid = key_id(key)
        self.keys[kid] = key
        return kid

    def revoke(self, kid: str) -> None:
        self.revoked.add(kid)

    def verify(self, data: bytes, signature: Signature) -> str:
        """Return the key id that signed ``data``, or raise :class:`SignatureError`."""
        if signature.alg != "ed25519":
            raise SignatureError(
                ReasonCode.SIGNATURE_INVALID, f"unsupported algorithm {signature.alg!r}"
            )
        if signature.key_id in self.revoked:
            raise SignatureError(ReasonCode.KEY_REVOKED, f"key {signature.key_id} is revoked")
        key = self.keys.get(signature.key_id)
        if key is None and signature.key_id in self.other_role:
            raise SignatureError(
                ReasonCode.KEY_WRONG_ROLE,
                f"key {signature.key_id} is not a {self.role or 'trusted'} key (another role's)",
            )
        if key is None:
            raise SignatureError(ReasonCode.KEY_UNKNOWN, f"key {signature.key_id} is not trusted")
        try:
            raw = base64.b64decode(signature.signature, validate=True)
            key.verify(raw, data)
        except (InvalidSignature, ValueError):
            raise SignatureError(
                ReasonCode.SIGNATURE_INVALID, f"signature by key {signature.key_id} does not verify"
            ) from None
        return signature.key_id
