"""Who may use the API and the dashboard: API tokens and users, with their roles.

Tokens and users come from the config (``[[auth.tokens]]``, ``[[auth.users]]``) or from the
registry (``edgefleet fleet token create``, ``fleet user add``), so every fleet-server
process on one registry accepts the same ones. Only hashes are stored.
"""

from __future__ import annotations

from collections.abc import Callable

from . import auth
from .audit_log import AuditLog
from .config import FleetConfig
from .errors import InvalidInput
from .repository import Repository


class Access:
    def __init__(
        self,
        config: FleetConfig,
        repo: Repository,
        clock: Callable[[], float],
        audit_log: AuditLog,
    ) -> None:
        self.config = config
        self.repo = repo
        self.clock = clock
        self.audit_log = audit_log

    def authenticate_token(self, token: str) -> str | None:
        """The token's role, or None."""
        for t in self.config.auth.tokens:
            if auth.token_matches(token, t.token_hash):
                return t.role
        return self.repo.token_role(auth.hash_token(token))

    def authenticate_user(self, username: str, password: str) -> str | None:
        """The user's role, or None. An unknown user costs the same scrypt work as a known one."""
        for u in self.config.auth.users:
            if u.username == username:
                return u.role if auth.verify_password(password, u.password_hash) else None
        row = self.repo.get_user(username)
        if row is None:
            auth.burn_password_check(password)
            return None
        if auth.verify_password(password, row["password_hash"]):
            return str(row["role"])
        return None

    def create_token(self, role: str, name: str = "", actor: str = "cli") -> str:
        if role not in auth.ROLES:
            raise InvalidInput(f"role must be one of {', '.join(auth.ROLES)}", field="role")
        token = auth.new_token()
        self.repo.add_token(auth.hash_token(token), role, name, self.clock())
        self.audit_log.audit(
            actor, "token.create", f"token:{name or role}", f"{role} token created"
        )
        self.audit_log.flush()
        return token

    def add_user(self, username: str, password: str, role: str, actor: str = "cli") -> None:
        if role not in auth.ROLES:
            raise InvalidInput(f"role must be one of {', '.join(auth.ROLES)}", field="role")
        self.repo.add_user(username, auth.hash_password(password), role)
        self.audit_log.audit(actor, "user.add", f"user:{username}", f"{role} user added")
        self.audit_log.flush()
