"""Wall time and peak memory of a block of work, for the protocol card."""

import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import torch

_STATM = Path("/proc/self/statm")
_SAMPLE_INTERVAL_S = 0.02
_MB = 2**20


def _rss_bytes() -> int | None:
    """Current resident set size from /proc (second field of statm, in pages); None where /proc is missing."""
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except OSError:
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    """Peak resident size of the whole process so far (not only the monitored block)."""
    import resource  # POSIX only, and only needed where /proc is missing

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024  # bytes on macOS, KiB elsewhere


class ResourceMonitor:
    """Wall time and peak memory of the enclosed work.

    ```
    with ResourceMonitor() as mon:
        work()
    mon.wall_s, mon.peak_rss_mb, mon.peak_cuda_mb, mon.as_dict()
    ```

    The peak resident memory is the largest of the values at entry, at exit and those sampled by a daemon
    thread every ~20 ms from /proc/self/statm, so a tensor allocated and freed inside the block still
    shows. Without /proc it falls back to `ru_maxrss`, the peak of the whole process so far, which can be
    larger than the block's. `peak_cuda_mb` is `torch.cuda.max_memory_allocated` after a reset at entry,
    None without CUDA. The values are None until the block has exited.
    """

    def __init__(self) -> None:
        self.wall_s: float | None = None
        self.entry_rss_mb: float | None = None
        self.peak_rss_mb: float | None = None
        self.peak_cuda_mb: float | None = None
        self._peak_bytes = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._start = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_INTERVAL_S):
            self._peak_bytes = max(self._peak_bytes, _rss_bytes() or 0)

    def __enter__(self) -> "ResourceMonitor":
        self.wall_s = self.peak_rss_mb = self.peak_cuda_mb = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        entry = _rss_bytes()
        if entry is None:
            entry = _max_rss_bytes()
        else:
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, name="prunekit-rss", daemon=True)
            self._sampler.start()
        self.entry_rss_mb = entry / _MB
        self._peak_bytes = entry
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wall_s = time.perf_counter() - self._start
        if self._sampler is None:
            exit_bytes = _max_rss_bytes()
        else:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            exit_bytes = _rss_bytes() or 0
        self.peak_rss_mb = max(self._peak_bytes, exit_bytes) / _MB
        if torch.cuda.is_available():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / _MB

    def as_dict(self) -> dict[str, float | None]:
        """The measurements as a JSON-ready dict for the `resources` field of a result record."""
        return {
            "wall_s": self.wall_s,
            "entry_rss_mb": self.entry_rss_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_cuda_mb": self.peak_cuda_mb,
        }
