"""Paths of a run's files, local or in a bucket (``gs://bucket/run``), without importing JAX.

A gs:// path goes through `etils.epath` (gcsfs underneath), a local one through the plain
`os`/`open` calls, so local behaviour is the same as without these helpers. Every module that
touches a run's files asks `is_remote` here rather than testing the string itself.
"""

from __future__ import annotations

import logging
import os

GCS_EXTRA = 'pip install "kdjax[gcs]"'


def is_remote(path) -> bool:
    """Whether `path` is an object-store URL (``gs://...``) rather than a local path."""
    return "://" in str(path)


def check_remote(path) -> None:
    """For a ``gs://`` path: one-line ValueError if the GCS packages are missing (or the scheme is
    not gs://). A local path: nothing."""
    path = str(path)
    if not is_remote(path):
        return
    if not path.startswith("gs://"):
        raise ValueError(f"workdir {path}: only local paths and gs:// buckets are supported")
    missing = []
    for module, package in (("etils.epath", "etils[epath]"), ("gcsfs", "gcsfs"),
                            ("google.cloud.storage", "google-cloud-storage")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ValueError(f"a gs:// workdir ({path}) needs {', '.join(missing)}: {GCS_EXTRA}")


def check_workdir(workdir: str, timeout: float = 20.0) -> None:
    """Before a run touches `workdir`: for gs://, that the GCS packages are installed and that the
    bucket exists and answers, one request without retries, so that a typo'd bucket or an
    unreachable endpoint is one-line ValueError within seconds rather than a retry storm. Every
    process checks (a bucket is shared by all of them). Nothing for a local path."""
    check_remote(workdir)
    if not is_remote(workdir):
        return
    bucket = str(workdir)[len("gs://"):].split("/", 1)[0]
    from google.cloud import storage

    try:
        found = storage.Client().bucket(bucket).exists(timeout=timeout, retry=None)
    except Exception as e:  # noqa: BLE001 - credentials, network, permissions: all end the run here
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot reach the bucket gs://{bucket} of workdir {workdir} ({type(e).__name__}: {reason})"
                         ) from None
    if not found:
        raise ValueError(f"the bucket gs://{bucket} of workdir {workdir} does not exist; create it "
                         f"(gcloud storage buckets create gs://{bucket}) or choose another --workdir")


def _epath(path):
    from etils import epath

    for name in ("fsspec", "gcsfs"):  # their INFO lines (one per object read) would flood absl's log
        logging.getLogger(name).setLevel(max(logging.getLogger(name).getEffectiveLevel(), logging.WARNING))
    return epath.Path(path)


def absolute(path: str) -> str:
    """os.path.abspath for a local path; a gs:// URL as it is (abspath would make it ./gs:/...)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """os.path.isdir; on GCS: whether any object lies under `path`/."""
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """The sorted names in folder `path` ([] if there is none)."""
    if is_remote(path):
        folder = _epath(path)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def relpath(path: str, start: str) -> str:
    """os.path.relpath, also for a gs:// `path` under a gs:// `start`."""
    if is_remote(path) or is_remote(start):
        start = str(start).rstrip("/") + "/"
        return str(path)[len(start):] if str(path).startswith(start) else str(path)
    return os.path.relpath(path, start)


def getsize(path: str) -> int:
    return _epath(path).stat().length if is_remote(path) else os.path.getsize(path)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open_file(path, "r") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes the whole file at once: locally to `path`.tmp and then renamed over `path` (a reader
    never sees half a file); on GCS one object write, which is atomic there (a rename is not)."""
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def save_figure(fig, path: str, **kwargs) -> None:
    """matplotlib's `fig.savefig` as PNG into `path` through `write_bytes` (so also into a bucket)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    write_bytes(path, buf.getvalue())


def save_npz(path: str, **arrays) -> None:
    """np.savez into `path`, whole or not at all: locally through `path`.tmp and a rename (streamed,
    no copy in memory), on GCS as one object write."""
    import io

    import numpy as np

    if is_remote(path):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_bytes(path, buf.getvalue())
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def load_npz(path: str):
    """np.load of an .npz at `path` (read whole from a bucket); use it as a context manager."""
    import io

    import numpy as np

    return np.load(io.BytesIO(read_bytes(path)) if is_remote(path) else path)


def makedirs(path: str) -> None:
    """os.makedirs(exist_ok=True) locally; nothing on GCS (objects need no folders)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r"):
    """open() for a local path, epath's open for gs:// (appending there would overwrite: refused)."""
    if not is_remote(path):
        return open(path, mode)
    if "a" in mode:
        raise ValueError(f"cannot append to {path}: an append on GCS overwrites the object")
    return _epath(path).open(mode)
