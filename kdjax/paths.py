"""Paths of a run's files, local or in a bucket (``gs://bucket/run``), without importing JAX.

A gs:// path goes through `etils.epath` (gcsfs underneath), a local one through the plain
`os`/`open` calls, so local behaviour is the same as without these helpers. Every module that
touches a run's files asks `is_remote` here rather than testing the string itself.
"""

from __future__ import annotations

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


def refuse_remote(path, what: str) -> None:
    """One-line ValueError if `path` is a gs:// URL: for the commands whose files do not yet go
    through the helpers here (they would write a local ./gs: folder)."""
    if path and is_remote(path):
        raise ValueError(f"{what} does not support gs:// paths yet ({path}); only a training run (experiments.digits, "
                         "experiments.cifar) reads and writes a bucket: copy the run to local disk "
                         "(gcloud storage cp -r) and point at the copy")


def _epath(path):
    from etils import epath

    return epath.Path(path)


def absolute(path: str) -> str:
    """os.path.abspath for a local path; a gs:// URL as it is (abspath would make it ./gs:/...)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


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
