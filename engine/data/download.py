"""Fetch an official file with an MD5 check, or say exactly where to put it by hand."""

from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path

from engine.data.errors import DataError

logger = logging.getLogger(__name__)


def fetch(url: str | None, target: Path, md5: str | None, *, what: str) -> Path:
    """Download ``url`` to ``target`` and verify its MD5 (MONAI's ``download_url``).

    Parameters
    ----------
    url
        Official address of the file; ``None`` when the file has no public source.
    target
        Where the file must end up (its parent is created).
    md5
        Expected MD5 hex digest; the download is rejected and removed when it differs.
    what
        Human name of the file for messages (e.g. ``"BreastMNIST (28x28)"``).

    Raises
    ------
    DataError
        When the file cannot be fetched (offline, no URL, not writable, wrong MD5). The
        message names the file, its official URL and MD5, and where to place it by hand.
    """
    from monai.apps.utils import download_url

    manual = (
        f"Place the file by hand at {target}"
        + (f" (download it from {url}" + (f", MD5 {md5})" if md5 else ")") if url else "")
        + f", or point --data-root / UMIM_DATA_ROOT at a folder holding {target.parent.name}/"
        f"{target.name}."
    )
    if url is None:
        raise DataError(f"{what}: {target} is missing and has no public download. {manual}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{what}: {target} is missing and its folder is not writable ({err}). "
                        f"{manual}") from err
    if not os.access(target.parent, os.W_OK):
        raise DataError(f"{what}: {target} is missing and {target.parent} is read-only. {manual}")
    logger.info("downloading %s from %s", what, url)
    try:
        download_url(url, filepath=target, hash_val=md5, hash_type="md5", progress=False)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        target.unlink(missing_ok=True)
        raise DataError(f"{what}: could not download {url} ({err}); are you offline? {manual}") \
            from err
    except Exception as err:  # MONAI raises RuntimeError subclasses for hash mismatches
        target.unlink(missing_ok=True)
        raise DataError(f"{what}: download from {url} failed its check ({err}). {manual}") from err
    return target
