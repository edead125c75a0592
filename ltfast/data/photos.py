"""A small, ImageNet-like photo set made from the JPEG wallpapers of a Debian package.

Debian's ``lomiri-wallpapers-16.04`` ships 15 large photos (1365x1074 to 5312x2988, mostly
progressive JPEGs). :func:`prepare_photo_set` re-encodes deterministic crops of them into a few
hundred baseline JPEGs of ImageNet's typical sizes (500x375, 500x333, 375x500, ...) at quality 90,
with the source photo's index as the label, and writes a list file in the survey's format
(``<relative path> <label>`` per line). The decoder tests and the data benchmark use it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile

DEFAULT_SOURCE_DIR = "/usr/share/backgrounds"
# ImageNet's most common sizes (width, height): the long side is 500.
_SIZES = ((500, 375), (500, 375), (500, 333), (375, 500), (500, 400), (500, 375), (333, 500), (500, 366))


def default_photo_dir(count: int = 300, quality: int = 90) -> str:
    """``$LTFAST_PHOTO_CACHE`` if set, else ``~/.cache/ltfast``; one sub-folder per (count, quality)."""
    base = os.environ.get("LTFAST_PHOTO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ltfast")
    return os.path.join(base, f"photos-{count}-q{quality}")


def source_photos(source_dir: str = DEFAULT_SOURCE_DIR) -> list[str]:
    paths = sorted(glob.glob(os.path.join(source_dir, "*.jpg")) + glob.glob(os.path.join(source_dir, "*.jpeg")))
    if not paths:
        raise FileNotFoundError(
            f"source_dir={source_dir!r} holds no .jpg photos (install the Debian package lomiri-wallpapers-16.04)")
    return paths


def prepare_photo_set(out_dir: str | None = None, count: int = 300, quality: int = 90, seed: int = 0,
                      source_dir: str = DEFAULT_SOURCE_DIR) -> str:
    """Writes ``count`` JPEG crops of the photos in ``source_dir`` to ``out_dir/<label>/<i>.jpg``
    and the list file ``out_dir/photos.txt``; returns the list file's path.

    Deterministic in (sources, count, quality, seed). Crop ``i`` comes from source photo
    ``i % len(sources)`` (its label), covers a random 15-100% of it at the target aspect ratio and is
    resized (Lanczos) to one of ImageNet's common sizes. A finished set is reused: the folder
    holds a manifest of these parameters, and it is written under a temporary name and renamed,
    so concurrent callers never see half a set.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
    import numpy as np
    from PIL import Image

    sources = source_photos(source_dir)
    out_dir = out_dir or default_photo_dir(count, quality)
    manifest = {"sources": [os.path.basename(p) for p in sources],
                "source_sizes": [os.path.getsize(p) for p in sources],
                "count": count, "quality": quality, "seed": seed, "version": 1}
    key = hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    list_file = os.path.join(out_dir, "photos.txt")
    manifest_file = os.path.join(out_dir, "manifest.json")
    if os.path.exists(list_file) and os.path.exists(manifest_file):
        try:
            with open(manifest_file) as f:
                if json.load(f).get("key") == key:
                    return list_file
        except (OSError, ValueError):
            pass

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".photos-", dir=parent)
    try:
        rng = np.random.default_rng(seed)
        lines = []
        per_source = [list(range(k, count, len(sources))) for k in range(len(sources))]
        for label, (path, items) in enumerate(zip(sources, per_source)):
            if not items:
                continue
            with Image.open(path) as im:
                # DCT-domain downscale while decoding (at most 1/4): the crops stay above 500 px.
                im.draft("RGB", (max(1200, im.size[0] // 4), max(900, im.size[1] // 4)))
                photo = im.convert("RGB")
            W, H = photo.size
            os.makedirs(os.path.join(tmp, str(label)), exist_ok=True)
            for i in items:
                w_out, h_out = _SIZES[int(rng.integers(len(_SIZES)))]
                aspect = w_out / h_out
                area = rng.uniform(0.15, 1.0) * W * H
                w = min(W, int(round((area * aspect) ** 0.5)))
                h = min(H, int(round(w / aspect)))
                w = min(W, int(round(h * aspect)))
                x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                crop = photo.resize((w_out, h_out), Image.LANCZOS, box=(x, y, x + w, y + h))
                rel = f"{label}/{i:05d}.jpg"
                crop.save(os.path.join(tmp, rel), "JPEG", quality=quality)
                lines.append((i, f"{rel} {label}\n"))
        with open(os.path.join(tmp, "photos.txt"), "w") as f:
            f.writelines(line for _, line in sorted(lines))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({**manifest, "key": key}, f)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: keep its set if it is the same one
            with open(manifest_file) as f:
                if json.load(f).get("key") != key:
                    raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return list_file
