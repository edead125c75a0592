"""Issue 13 §1.5: loader errors name the file. A GIF and a PIL decompression bomb on the DALI path,
and an undecodable file behind PIL DataLoader workers, are ImageDecodeError with the path."""
import pytest
import torch

pytest.importorskip("nvidia.dali")

from ltfast.data import ListDataset  # noqa: E402
from ltfast.data.dali import ImageDecodeError, make_image_loader  # noqa: E402


def _folder(tmp_path, victim_format="JPEG"):
    from PIL import Image
    paths = []
    for k in range(4):
        fmt = victim_format if k == 2 else "JPEG"
        name = f"{k}.{'gif' if fmt == 'GIF' else 'jpg'}"
        Image.fromarray((torch.rand(24, 24, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / name, fmt)
        paths.append(name)
    return ListDataset(str(tmp_path), paths, torch.arange(4)), tmp_path / paths[2]


def _run(dataset, backend, **extra):
    loader = make_image_loader(backend, dataset=dataset, sampler=None, batch_size=2, train=False, crop_size=16,
                               resize_size=16, **extra)
    return [x for x, _ in loader]


def test_gif_on_the_dali_path_names_the_file(tmp_path):
    # Used to fail as "nvImageCodec failure: '#4'", with no path.
    dataset, victim = _folder(tmp_path, "GIF")
    with pytest.raises(ImageDecodeError, match=r"GIF images are not decoded by DALI.*data\.backend=pil") as info:
        _run(dataset, "dali", num_threads=1)
    assert info.value.path == str(victim)


def test_decompression_bomb_on_the_dali_path_names_the_file(tmp_path, monkeypatch):
    # A 14000x14000 JPEG raised PIL's bare DecompressionBombError; a limit of 100 pixels makes a
    # 24x24 (576 > 2 x 100) image trip the same guard here.
    from PIL import Image
    dataset, _ = _folder(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match=r"0\.jpg.*MAX_IMAGE_PIXELS") as info:
        _run(dataset, "dali", num_threads=1)
    assert info.value.path == str(tmp_path / "0.jpg")


def test_pil_workers_raise_image_decode_error_with_the_path(tmp_path):
    # Through DataLoader workers the error came back as a RuntimeError. Run in a fresh process: the
    # PIL loader forks its workers, and a fork taken after this suite has run DALI pipelines and
    # OpenMP kernels in the same process hung in the child (a lock held by a parent thread).
    import subprocess
    import sys
    script = f"""
import torch, sys
sys.path.insert(0, {repr(str(__import__("os").path.dirname(__file__)))})
from test_dali_errors import _folder, _run
from ltfast.data.dali import ImageDecodeError
from pathlib import Path
dataset, victim = _folder(Path({repr(str(tmp_path))}))
victim.write_bytes(b"not an image" * 10)
try:
    _run(dataset, "pil", num_workers=1)
except ImageDecodeError as error:
    print("CAUGHT", type(error).__name__, error.path, error.index)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert f"CAUGHT ImageDecodeError {tmp_path / '2.jpg'} 2" in done.stdout, done.stdout + done.stderr
