"""The reference executor's share of task deletions (docs/storage.md, "Deleting"): claim a few,
carry each out (app/executor/deletion.py) in a thread while heartbeats keep its lease, report it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from app.executor.client import ExecutorApi
from app.executor.deletion import ClaimedDeletion, carry_out
from app.executor.download import NoCommit, Unreachable, UnsafePath
from app.executor.settings import Config

log = logging.getLogger("dlw.executor")


async def claim_and_carry_out(api: ExecutorApi, config: Config, most: int) -> int:
    """Claim a few task deletions and carry each out, its lease kept by heartbeats."""
    claimed = await api.claim_deletions(most, config.lease_seconds, config.label)
    for item in claimed:
        deletion = ClaimedDeletion.from_api(item)
        work = asyncio.ensure_future(asyncio.to_thread(carry_out, config.storages, deletion))
        lost = asyncio.Event()
        beats = asyncio.create_task(_heartbeats(api, deletion, work, lost))
        try:
            removed = await work
        except (UnsafePath, NoCommit) as exc:  # a name that would leave the root: final
            await _fail(api, deletion, str(exc), retryable=False)
            continue
        except Unreachable as exc:  # not a root this executor serves: for another executor
            await _fail(api, deletion, f"executor {config.label}: {exc}", retryable=True)
            continue
        except OSError as exc:
            await _fail(api, deletion, f"{type(exc).__name__}: {exc}", retryable=True)
            continue
        except asyncio.CancelledError:
            if not lost.is_set():
                raise
            log.warning("deletion of task %s: lease lost; not reported", deletion.task_id)
            continue
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        outcome = await api.report_deletion(deletion.id, deletion.token, "complete", {})
        log.info(
            "deletion of task %s: %s (%d files, %d blobs, %d refs, %d bytes freed on disk)",
            deletion.task_id,
            outcome,
            removed.files,
            removed.blobs,
            removed.refs,
            removed.bytes,
        )
    return len(claimed)


async def _heartbeats(
    api: ExecutorApi, deletion: ClaimedDeletion, work: asyncio.Future[Any], lost: asyncio.Event
) -> None:
    """Keep the deletion's lease; on a lost one, cancel the work (nothing is reported)."""
    while True:
        await asyncio.sleep(max(deletion.lease_seconds / 3, 0.2))
        outcome = await api.report_deletion(deletion.id, deletion.token, "heartbeat", {})
        if outcome in ("LEASE_LOST", "DELETION_NOT_FOUND"):
            lost.set()
            work.cancel()  # the thread finishes its unlinks; nothing is reported
            return


async def _fail(api: ExecutorApi, deletion: ClaimedDeletion, error: str, *, retryable: bool) -> None:
    log.warning("deletion of task %s: %s (%s)", deletion.task_id, error, "retryable" if retryable else "final")
    await api.report_deletion(deletion.id, deletion.token, "fail", {"error": error[:2000], "retryable": retryable})
