"""A sweep's coordination in a bucket (``--workdir=gs://...``), where there are no file locks and no
appends: what `FileLock`, Optuna's journal file and heartbeat files do on a POSIX folder, built
on GCS's one atomic primitive, the conditional create (``if_generation_match=0``: the write
succeeds only if no object of that name exists).

- `BucketLock`: held while its object exists. A holder rewrites the object every `refresh_s`
  seconds (a new generation, conditional on its own previous one); a waiter deletes one that has
  not been rewritten for `stale_s` (its holder died), naming the generation it saw, so that it
  never deletes a newer holder's lock.
- `BucketJournal`: an Optuna `BaseJournalBackend`. Every ``append_logs`` call is one object
  ``<prefix>/<k>`` (k = 0, 1, ... zero-padded), created conditionally: two workers that append
  at once cannot both take segment k; the loser reads the winner's segment and takes k + 1.
  The log number of a record is its position in the segments' concatenation.
- `touch` / `age`: a heartbeat object and its age by the bucket's own clock (``updated``).

google-cloud-storage is imported here only (the ``kdjax[gcs]`` extra); the module itself is imported
only by a sweep in a bucket, which imports optuna anyway.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterable

from optuna.storages.journal import BaseJournalBackend  # (this module is imported by a bucket sweep only)


def _split(url: str) -> tuple[str, str]:
    bucket, _, name = url[len("gs://"):].partition("/")
    return bucket, name


def _blob(url: str):
    from google.cloud import storage

    bucket, name = _split(url)
    return storage.Client().bucket(bucket).blob(name)


def touch(url: str) -> None:
    _blob(url).upload_from_string(str(time.time()), retry=None)


def age(url: str) -> float:
    """Seconds since the object was last written, by the bucket's clock; inf if there is none."""
    from google.api_core import exceptions

    blob = _blob(url)
    try:
        blob.reload()
    except exceptions.NotFound:
        return float("inf")
    return max(0.0, time.time() - blob.updated.timestamp())


def delete(url: str) -> None:
    from google.api_core import exceptions

    try:
        _blob(url).delete()
    except exceptions.NotFound:
        pass


class BucketLock:
    """An exclusive lock held while the object `url` exists (see the module docstring)."""

    def __init__(self, url: str, refresh_s: float = 10.0, stale_s: float = 120.0, poll_s: float = 0.2):
        self.path, self.refresh_s, self.stale_s, self.poll_s = url, refresh_s, stale_s, poll_s
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        from google.api_core import exceptions

        blob = _blob(self.path)
        while True:
            try:
                blob.upload_from_string(json.dumps({"time": time.time()}), if_generation_match=0, retry=None)
                self._generation = blob.generation
                break
            except exceptions.PreconditionFailed:  # held: by a live worker, or by a dead one
                try:
                    blob.reload()
                    if time.time() - blob.updated.timestamp() > self.stale_s:
                        blob.delete(if_generation_match=blob.generation)
                        continue
                except (exceptions.NotFound, exceptions.PreconditionFailed):
                    continue  # released or taken meanwhile: try again at once
                time.sleep(self.poll_s)
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        from google.api_core import exceptions

        while not self._stop.wait(self.refresh_s):
            blob = _blob(self.path)
            try:  # a new generation of our own object (if it is still ours): its `updated` is now
                blob.upload_from_string(json.dumps({"time": time.time()}), if_generation_match=self._generation,
                                        retry=None)
                self._generation = blob.generation
            except exceptions.GoogleAPIError:  # (it was broken as stale: the next acquire finds out)
                pass

    def release(self) -> None:
        from google.api_core import exceptions

        if self._generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            _blob(self.path).delete(if_generation_match=self._generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass
        self._generation = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class BucketJournal(BaseJournalBackend):
    """Optuna journal records in the segments ``<url>/<k>`` (see the module docstring)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._segments: list[list[dict[str, Any]]] = []

    def _name(self, k: int) -> str:
        return f"{self.url}/{k:012d}.json"

    def _sync(self) -> None:
        """Reads the segments written since the last call, in order."""
        from google.api_core import exceptions

        while True:
            try:
                text = _blob(self._name(len(self._segments))).download_as_bytes(retry=None)
            except exceptions.NotFound:
                return
            self._segments.append(json.loads(text))

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        self._sync()
        logs = [record for segment in self._segments for record in segment]
        return logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        from google.api_core import exceptions

        data = json.dumps(logs)
        while True:
            self._sync()
            try:
                _blob(self._name(len(self._segments))).upload_from_string(data, if_generation_match=0, retry=None)
                self._segments.append(json.loads(data))
                return
            except exceptions.PreconditionFailed:  # another worker took this segment: read it, take the next
                continue


def journal_storage(url: str):
    """An Optuna JournalStorage whose records live in the bucket folder `url`."""
    import optuna

    return optuna.storages.JournalStorage(BucketJournal(url))
