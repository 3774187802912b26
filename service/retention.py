"""REID_RETENTION_DAYS: what has expired is erased at start-up, before the service is ready, then every
REID_RETENTION_INTERVAL_S, the way a person is erased."""

import asyncio
import logging
import time

from service.form_fields import SECONDS_PER_DAY
from service.gallery import GalleryBase
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger(__name__)


async def purge_expired(gallery: GalleryBase, days: float, metrics: ServiceMetrics) -> int:
    """Erase what REID_RETENTION_DAYS has expired, the way a person is erased (one transaction, WAL wiped)."""
    erased = await gallery.erase_older_than(time.time() - days * SECONDS_PER_DAY)
    metrics.erased.labels("retention").inc(len(erased))
    if erased:
        log.info("retention: erased %d item(s) older than %g days", len(erased), days)
    return len(erased)


async def retention_loop(gallery: GalleryBase, settings: Settings, metrics: ServiceMetrics) -> None:
    while True:
        await asyncio.sleep(settings.retention_interval_s)
        try:
            await purge_expired(gallery, settings.retention_days, metrics)
        except Exception:  # a full disk, say: the next round tries again
            log.exception("retention purge failed; next try in %g s", settings.retention_interval_s)
        metrics.gallery_size.set(gallery.size)
