"""The manager's events part: what happened to a container goes to its owner's
subscribers (``EventBus``), the lifecycle log and the stored event log, together."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rexecd import logs
from rexecd.config import Config
from rexecd.models import ContainerRecord, Event, utcnow
from rexecd.service.events import EventBus
from rexecd.service.progress import Background, Reporter
from rexecd.service.store import Store
from rexecd.service.storethread import in_store_thread

# The lifecycle log line's event for each published event kind.
_LIFECYCLE = {
    "created": "create",
    "started": "start",
    "stopped": "stop",
    "deleted": "delete",
    "updated": "update",
    "oom": "oom-kill",
}


class Publisher:
    def __init__(self, cfg: Config, store: Store, bus: EventBus, bg: Background) -> None:
        self.cfg, self.store, self.bus, self.bg = cfg, store, bus, bg

    def subscribe(self, user_id: str) -> AsyncIterator[Event]:
        return self.bus.subscribe(user_id)

    def publish(
        self,
        kind: str,
        rec: ContainerRecord,
        *,
        lifecycle: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Publish the event ``kind`` and write its lifecycle log line (``lifecycle``
        names the line's event when it is not the kind's: an exit, an expiry)."""
        event = Event.model_validate(
            {"type": kind, "container": rec.to_out(), "timestamp": utcnow()}
        )
        self.bus.publish(rec.user_id, event)
        self.bg.spawn(self.log_lifecycle(lifecycle or _LIFECYCLE.get(kind, kind), rec, detail))
        self.bg.spawn(
            in_store_thread(
                self.store.append_event,
                kind,
                {"name": rec.name, "status": rec.status},
                user_id=rec.user_id,
                container_db_id=rec.db_id,
                ts=utcnow(),
                keep=self.cfg.retention.events_max_rows,
            )
        )

    async def stage(
        self, rec: ContainerRecord, report: Reporter, stage: str, message: str, pct: int
    ) -> None:
        """A create's progress at ``stage``: a stream frame and a ``progress`` event."""
        await report(stage, message, pct, container_id=rec.id)
        self.bus.publish(
            rec.user_id,
            Event(
                type="progress",
                container=rec.to_out(),
                timestamp=utcnow(),
                stage=stage,
                message=message,
                progress=pct,
            ),
        )

    async def log_lifecycle(self, event: str, rec: ContainerRecord, detail: str | None) -> None:
        user = await in_store_thread(self.store.get_user, rec.user_id)
        logs.lifecycle(event, rec, detail, user.name if user is not None else None)

    def close(self) -> None:
        self.bus.close()
