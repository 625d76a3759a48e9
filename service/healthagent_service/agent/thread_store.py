"""ChatKit's `Store` on the project's database, every record scoped to its end user.

What the SDK leaves to the store, decided here:
- Another user's thread, item or attachment is not found (`NotFoundError`), exactly like one that
  does not exist, so ids cannot be probed.
- Ids are 128 random bits (the SDK's default is 32, which a busy server would repeat).
- `save_item` and `add_thread_item` are upserts: the SDK saves a completed client tool call, and
  a replaced item, under an id it already stored.
- Order is `created_at`, then insertion; a page's `after` is the id of its last record, set only
  when there is more, an exclusive cursor, as the SDK's `Page` says.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from chatkit.store import NotFoundError, Store, StoreItemType
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata
from pydantic import TypeAdapter

from healthagent_service.agent.database import AgentDatabase, Row

_ITEM = TypeAdapter[ThreadItem](ThreadItem)
_ATTACHMENT = TypeAdapter[Attachment](Attachment)
_ID_PREFIXES: dict[str, str] = {
    "thread": "thr",
    "message": "msg",
    "tool_call": "tc",
    "workflow": "wf",
    "task": "tsk",
    "attachment": "atc",
    "sdk_hidden_context": "shcx",
}
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who a ChatKit request is for, and how the agent server knows.

    `via` is "service" for a request the HealthAgent service forwarded (trusted to name the user)
    and "token" for one carrying a user token that MintSession issued.
    """

    user: str
    via: Literal["service", "token", "loopback"]
    state_variables: dict[str, Any] = field(default_factory=dict)


def _random_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _timestamp(moment: datetime) -> float:
    # the SDK stamps records with a naive local datetime.now(); .timestamp() reads it as local
    return moment.timestamp()


def _order(order: str) -> tuple[str, str]:
    """(comparison, SQL direction) for an `asc`/`desc` page."""
    return (">", "ASC") if order == "asc" else ("<", "DESC")


def _limit(limit: int) -> int:
    return max(1, min(MAX_PAGE_SIZE, limit))


class ThreadStore(Store[RequestContext]):
    """Threads, items and attachments in `agent_*` tables."""

    def __init__(self, database: AgentDatabase) -> None:
        self.database = database

    # -- ids ---------------------------------------------------------------------------------

    def generate_thread_id(self, context: RequestContext) -> str:
        return _random_id("thr")

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: RequestContext
    ) -> str:
        return _random_id(_ID_PREFIXES.get(item_type, "itm"))

    def generate_attachment_id(self, mime_type: str, context: RequestContext) -> str:
        return _random_id("atc")

    # -- threads -----------------------------------------------------------------------------

    async def load_thread(self, thread_id: str, context: RequestContext) -> ThreadMetadata:
        rows = await self.database.fetch(
            "SELECT data FROM agent_threads WHERE id = ? AND user_id = ?", thread_id, context.user
        )
        if not rows:
            raise NotFoundError(f"Thread {thread_id} not found")
        return ThreadMetadata.model_validate_json(rows[0][0])

    async def save_thread(self, thread: ThreadMetadata, context: RequestContext) -> None:
        # the SDK may hand over a `Thread` with its items: keep the metadata alone
        metadata = ThreadMetadata.model_validate(
            thread.model_dump(include=set(ThreadMetadata.model_fields))
        )
        changed = await self.database.execute(
            "INSERT INTO agent_threads (id, user_id, created_at, seq, data) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET data = excluded.data"
            " WHERE agent_threads.user_id = excluded.user_id",
            metadata.id,
            context.user,
            _timestamp(metadata.created_at),
            time.time_ns(),
            metadata.model_dump_json(),
        )
        if not changed:  # the id is another user's
            raise NotFoundError(f"Thread {metadata.id} not found")

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: RequestContext
    ) -> Page[ThreadMetadata]:
        return await self._page(
            "agent_threads",
            ("user_id = ?", context.user),
            after=after,
            limit=limit,
            order=order,
            parse=ThreadMetadata.model_validate_json,
        )

    async def delete_thread(self, thread_id: str, context: RequestContext) -> None:
        await self.load_thread(thread_id, context)
        await self.database.execute(
            "DELETE FROM agent_items WHERE thread_id = ? AND user_id = ?", thread_id, context.user
        )
        await self.database.execute(
            "DELETE FROM agent_threads WHERE id = ? AND user_id = ?", thread_id, context.user
        )

    # -- items -------------------------------------------------------------------------------

    async def load_thread_items(
        self,
        thread_id: str,
        after: str | None,
        limit: int,
        order: str,
        context: RequestContext,
    ) -> Page[ThreadItem]:
        await self.load_thread(thread_id, context)
        return await self._page(
            "agent_items",
            ("thread_id = ? AND user_id = ?", thread_id, context.user),
            after=after,
            limit=limit,
            order=order,
            parse=_ITEM.validate_json,
        )

    async def add_thread_item(
        self, thread_id: str, item: ThreadItem, context: RequestContext
    ) -> None:
        await self.save_item(thread_id, item, context)

    async def save_item(self, thread_id: str, item: ThreadItem, context: RequestContext) -> None:
        await self.load_thread(thread_id, context)
        # an upsert that keeps the item's place in the thread (its first seq)
        await self.database.execute(
            "INSERT INTO agent_items (thread_id, id, user_id, created_at, seq, data)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (thread_id, id) DO UPDATE SET data = excluded.data,"
            " created_at = excluded.created_at WHERE agent_items.user_id = excluded.user_id",
            thread_id,
            item.id,
            context.user,
            _timestamp(item.created_at),
            time.time_ns(),
            item.model_dump_json(),
        )

    async def load_item(self, thread_id: str, item_id: str, context: RequestContext) -> ThreadItem:
        rows = await self.database.fetch(
            "SELECT data FROM agent_items WHERE thread_id = ? AND id = ? AND user_id = ?",
            thread_id,
            item_id,
            context.user,
        )
        if not rows:
            raise NotFoundError(f"Item {item_id} not found")
        return _ITEM.validate_json(rows[0][0])

    async def delete_thread_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> None:
        await self.database.execute(
            "DELETE FROM agent_items WHERE thread_id = ? AND id = ? AND user_id = ?",
            thread_id,
            item_id,
            context.user,
        )

    async def _page(
        self,
        table: str,
        scope: tuple[Any, ...],
        *,
        after: str | None,
        limit: int,
        order: str,
        parse: Any,
    ) -> Page[Any]:
        """One page of `table`'s rows within `scope` (a WHERE clause and its arguments), in
        `created_at` order, after the row whose id is `after` (exclusive)."""
        where, *args = scope
        compare, direction = _order(order)
        if after:
            cursor = await self.database.fetch(
                f"SELECT created_at, seq FROM {table} WHERE {where} AND id = ?", *args, after
            )
            if not cursor:
                raise NotFoundError(f"{after} not found")
            where += f" AND (created_at, seq) {compare} (?, ?)"
            args.extend(cursor[0])
        rows = await self.database.fetch(
            f"SELECT id, data FROM {table} WHERE {where}"
            f" ORDER BY created_at {direction}, seq {direction} LIMIT ?",
            *args,
            _limit(limit) + 1,
        )
        return _page(rows, _limit(limit), parse)

    # -- attachments -------------------------------------------------------------------------

    async def save_attachment(self, attachment: Attachment, context: RequestContext) -> None:
        changed = await self.database.execute(
            "INSERT INTO agent_attachments (id, user_id, data) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET data = excluded.data"
            " WHERE agent_attachments.user_id = excluded.user_id",
            attachment.id,
            context.user,
            attachment.model_dump_json(),
        )
        if not changed:
            raise NotFoundError(f"Attachment {attachment.id} not found")

    async def load_attachment(self, attachment_id: str, context: RequestContext) -> Attachment:
        rows = await self.database.fetch(
            "SELECT data FROM agent_attachments WHERE id = ? AND user_id = ?",
            attachment_id,
            context.user,
        )
        if not rows:
            raise NotFoundError(f"Attachment {attachment_id} not found")
        return _ATTACHMENT.validate_json(rows[0][0])

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        await self.database.execute(
            "DELETE FROM agent_attachments WHERE id = ? AND user_id = ?",
            attachment_id,
            context.user,
        )


def _page(rows: list[Row], limit: int, parse: Any) -> Page[Any]:
    has_more = len(rows) > limit
    kept = rows[:limit]
    return Page(
        data=[parse(data) for _, data in kept],
        has_more=has_more,
        after=kept[-1][0] if has_more and kept else None,
    )
