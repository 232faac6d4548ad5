"""Virtual API keys: looked up by sha256 of the presented key; plaintext is never kept."""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass

from .errors import GatewayError
from .schema import VirtualKey

#: nano-USD per USD: spend is kept as integers so totals add up exactly
NANO = 1_000_000_000


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    team: str
    user: str
    models: tuple[str, ...]
    rpm: int | None
    tpm: int | None
    budget_nusd: int | None

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)


#: the identity of requests when keys are not required
ANONYMOUS = KeyInfo("anonymous", "", "", (), None, None, None)


class KeyStore:
    def __init__(self, keys: list[VirtualKey], *, required: bool) -> None:
        self.required = required
        self._by_digest: dict[str, KeyInfo] = {}
        for k in keys:
            budget = None if k.budget is None else round(k.budget * NANO)
            self._by_digest[k.digest] = KeyInfo(
                k.key_id, k.team, k.user, tuple(k.models), k.rpm, k.tpm, budget
            )

    def authenticate(self, authorization: str | None, x_api_key: str | None) -> KeyInfo:
        presented = ""
        if authorization and authorization[:7].lower() == "bearer ":
            presented = authorization[7:].strip()
        elif x_api_key:
            presented = x_api_key.strip()
        if not presented:
            if not self.required:
                return ANONYMOUS
            raise GatewayError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        digest = hashlib.sha256(presented.encode()).hexdigest()
        info = self._by_digest.get(digest)
        if info is None:
            if not self.required:
                return ANONYMOUS
            raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
        return info
