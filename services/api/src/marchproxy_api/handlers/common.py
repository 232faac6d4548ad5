"""Small helpers shared by handlers."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from marchproxy_api.db.models import Module
from marchproxy_api.endpoints import Ctx
from marchproxy_api.errors import not_found
from marchproxy_api.keys import sessionmaker_key
from marchproxy_api.repos.base import snapshot_row
from marchproxy_api.repos.entities import ModuleRepo

P = TypeVar("P", bound=BaseModel)


def page(model: type[P], out: type[BaseModel], rows: list[Any], total: int, q: Any) -> P:
    return model(
        items=[out.model_validate(r) for r in rows], total=total, limit=q.limit, offset=q.offset
    )


def read_session(ctx: Ctx) -> AsyncSession:
    session: AsyncSession = ctx.app[sessionmaker_key]()
    return session


async def module_or_404(session: AsyncSession, module_id: int, *, lock: bool = False) -> Module:
    mod = await ModuleRepo(session).get(module_id, lock=lock)
    if mod is None:
        raise not_found("module", module_id)
    return mod


def changes(body: BaseModel) -> dict[str, Any]:
    """Fields the client sent with a value (PATCH semantics: null/absent = unchanged)."""
    return {
        k: v for k, v in body.model_dump(exclude_unset=True, mode="json").items() if v is not None
    }


row = snapshot_row
