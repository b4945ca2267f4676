"""Layer 1: token-budget continuous batching over the KV-cache manager. No torch."""

from inferd.scheduler.scheduler import (
    CachedRequestData,
    NewRequestData,
    Scheduler,
    SchedulerOutput,
    request_needs_sample,
)

__all__ = ["CachedRequestData", "NewRequestData", "Scheduler", "SchedulerOutput", "request_needs_sample"]
