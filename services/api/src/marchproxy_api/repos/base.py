"""Generic SQL for one table: get, list with filters and paging, add, update, delete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped

from marchproxy_api.db.models import Base


class IdModel(Protocol):
    """A mapped model with an integer primary key ``id``: what Repo needs (``Base`` itself
    declares no columns)."""

    id: Mapped[int]

    def __init__(self, **kw: Any) -> None: ...


M = TypeVar("M", bound=IdModel)


class Repo(Generic[M]):
    model: type[M]

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, ident: int, *, lock: bool = False) -> M | None:
        if lock:
            stmt = select(self.model).where(self.model.id == ident).with_for_update()
            return (await self.session.execute(stmt)).scalar_one_or_none()
        return await self.session.get(self.model, ident)

    async def page(
        self,
        where: Sequence[ColumnElement[bool]] = (),
        *,
        limit: int = 100,
        offset: int = 0,
        order: Any = None,
    ) -> tuple[list[M], int]:
        base = select(self.model).where(*where)
        total = (
            await self.session.execute(select(func.count()).select_from(base.subquery()))
        ).scalar_one()
        order_by = order if order is not None else self.model.id
        rows = await self.session.execute(base.order_by(order_by).limit(limit).offset(offset))
        return list(rows.scalars()), int(total)

    async def all(self, *where: ColumnElement[bool]) -> list[M]:
        rows = await self.session.execute(select(self.model).where(*where).order_by(self.model.id))
        return list(rows.scalars())

    async def add(self, values: Mapping[str, Any]) -> M:
        obj = self.model(**values)
        self.session.add(obj)
        await self.session.flush()
        return obj

    async def update(self, obj: M, values: Mapping[str, Any]) -> M:
        for k, v in values.items():
            setattr(obj, k, v)
        await self.session.flush()
        return obj

    async def delete(self, obj: M) -> None:
        await self.session.delete(obj)
        await self.session.flush()


def snapshot_row(obj: Base) -> dict[str, Any]:
    """Column values of a row as plain JSON-able data (for audit before/after)."""
    out: dict[str, Any] = {}
    for col in obj.__table__.columns:
        val = getattr(obj, col.key)
        if hasattr(val, "isoformat"):
            val = val.isoformat()
        if col.key == "password_hash":
            continue
        out[col.key] = val
    return out
