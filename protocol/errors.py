"""The exception tree every edgefleet program shares.

    EdgefleetError
    ├── ProtocolError            malformed manifest, message or sketch bytes
    ├── ProfileError             unknown or invalid device profile
    ├── BundleError              a bundle that must not be installed; carries a ReasonCode
    │   ├── ArchiveError         hostile or broken .efb archive (traversal, oversize, duplicates)
    │   └── SignatureError       bad signature, unknown or revoked key
    ├── OverBudget               a model (or every variant) does not fit a profile's budget
    ├── AddressInUse             a port we must listen on is taken
    └── Unreachable              a server or broker we must talk to does not answer

The last three exist so the root CLI (``edgefleet/cli.py``) can give them their own exit
codes without importing the program that raised them.

Every refusal carries a machine-readable :class:`ReasonCode` so that the agent can report
it on the status topic and the fleet server can count it.
"""

from __future__ import annotations

from enum import Enum


class ReasonCode(str, Enum):
    """Why a bundle or command was refused (sent verbatim in status messages)."""

    ARCHIVE_UNSAFE = "archive_unsafe"
    ARCHIVE_INVALID = "archive_invalid"
    MISSING_FILE = "missing_file"
    MANIFEST_INVALID = "manifest_invalid"
    SIGNATURE_INVALID = "signature_invalid"
    KEY_UNKNOWN = "key_unknown"
    KEY_REVOKED = "key_revoked"
    HASH_MISMATCH = "hash_mismatch"
    RELEASE_NOT_NEWER = "release_not_newer"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    PROFILE_INCOMPATIBLE = "profile_incompatible"
    RUNTIME_UNAVAILABLE = "runtime_unavailable"
    MODEL_LOAD_FAILED = "model_load_failed"
    SMOKE_TEST_FAILED = "smoke_test_failed"
    DISK_FULL = "disk_full"
    DOWNLOAD_FAILED = "download_failed"
    TIMEOUT = "timeout"
    COMMAND_INVALID = "command_invalid"  # missing payload, bad config key, malformed fields
    KEY_WRONG_ROLE = "key_wrong_role"  # a bundle key on a command, or a command key on a bundle
    NOT_ADDRESSED = "not_addressed"  # a command for another device id
    COMMAND_EXPIRED = "command_expired"  # past its expires_at
    COMMAND_FROM_FUTURE = "command_from_future"  # issued_at beyond the allowed clock skew
    COMMAND_REPLAYED = "command_replayed"  # its command id is already in the ledger
    LIMIT_EXCEEDED = "limit_exceeded"  # a size, chunk size or chunk count over the caps
    ORIGIN_UNTRUSTED = "origin_untrusted"  # http_url outside the device's artifact origins
    MODEL_NAME_MISMATCH = "model_name_mismatch"  # another model's name, without replace_model
    VERSION_NOT_INSTALLED = "version_not_installed"  # a rollback target no slot holds
    INTERNAL = "internal"


class EdgefleetError(Exception):
    """Base class of every error edgefleet raises on purpose."""


class ProtocolError(EdgefleetError):
    """Bytes that do not parse as the contract says (manifest, message, sketch)."""


class ProfileError(EdgefleetError):
    """A device profile that does not exist or does not validate."""


class BundleError(EdgefleetError):
    """A bundle that must not be installed. ``reason`` says why in one code."""

    def __init__(self, reason: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


class ArchiveError(BundleError):
    """The .efb zip itself is unsafe or broken."""


class SignatureError(BundleError):
    """The manifest signature does not verify against the trust store."""


class OverBudget(EdgefleetError):
    """A model, or every variant of it, does not fit the device profile's budget."""


class AddressInUse(EdgefleetError):
    """A host:port we must listen on is already taken by another process."""


class Unreachable(EdgefleetError):
    """A server or broker we must talk to does not answer (wrong URL, down, refused)."""
