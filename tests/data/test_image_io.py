"""Images nobody curated: every mode read to the right RGB values, every bad file named or
skipped and counted (data.on_bad_image), also from DataLoader workers and the CLI."""

import csv
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from memory_cap import run_capped
from PIL import Image
from torch.utils.data import DataLoader

from glassmetric.data.folder import ImageFolderDataset
from glassmetric.data.image_io import collate_readable, open_image
from glassmetric.data.sampler import MPerClassBatchSampler
from glassmetric.errors import DataError
from glassmetric.models import build_model
from glassmetric.retrieval.embed import embed_fields

SRC = Path(__file__).resolve().parents[2] / "src"
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (6, 7), dtype=np.uint16)
CMYK = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
INDICES = RNG.integers(0, 16, (6, 7), dtype=np.uint8)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(float) / 255
    return rgb * a + 255 * (1 - a)


def _palette_image(transparent: bool = False) -> Image.Image:
    img = Image.fromarray(INDICES, "P")
    img.putpalette(PALETTE.flatten().tolist())
    if transparent:
        img.info["transparency"] = 3  # palette entry 3 is see-through
    return img


#: file name -> (writer, the RGB values it must read as, independently computed, tolerance)
GOOD = {
    "rgb.png": (lambda p: Image.fromarray(RGB).save(p), RGB, 0),
    "palette.png": (lambda p: _palette_image().save(p), PALETTE[INDICES], 0),
    "palette alpha.png": (
        lambda p: _palette_image(True).save(p, transparency=3),
        np.where((INDICES == 3)[..., None], 255, PALETTE[INDICES]),
        0,
    ),
    "rgba.png": (lambda p: Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA").save(p), _over_white(RGB, ALPHA), 1),
    "gray alpha.png": (
        lambda p: Image.fromarray(np.dstack([RGB[..., 0], ALPHA]), "LA").save(p),
        np.repeat(_over_white(RGB[..., :1], ALPHA), 3, 2),
        1,
    ),
    "gray.png": (lambda p: Image.fromarray(RGB[..., 0], "L").save(p), np.repeat(RGB[..., :1], 3, 2), 0),
    "gray16.png": (lambda p: Image.fromarray(GRAY16).save(p), np.repeat(np.round(GRAY16 / 257)[..., None], 3, 2), 0),
    "cmyk.tif": (
        lambda p: Image.fromarray(CMYK, "CMYK").save(p),
        (255 - CMYK[..., :3].astype(float)) * (255 - CMYK[..., 3:].astype(float)) / 255,
        1,
    ),
    "ünïcödé name with spaces.png": (lambda p: Image.fromarray(RGB).save(p), RGB, 0),
}


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height grey pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


#: file name -> (writer, what the error says)
BAD = {
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "cannot identify"),
    "text.png": (lambda p: p.write_text("this is not an image"), "cannot identify"),
    "bomb.png": (lambda p: _png_header_only(p, 100_000, 100_000), "decompression bomb"),
}


def write_corpus(folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        writer = (GOOD.get(name) or BAD[name])[0]
        paths.append(folder / name)
        writer(paths[-1])
    return paths


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_mode_reads_as_the_right_rgb(tmp_path, name):
    (path,) = write_corpus(tmp_path / "a dir with späces", [name])
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (7, 6)
    expected = GOOD[name][1]
    assert np.abs(np.asarray(img).astype(float) - expected).max() <= GOOD[name][2]


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert open_image(path).size == (20, 40)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_one_line_naming_the_file(tmp_path, name):
    (path,) = write_corpus(tmp_path, [name])
    with pytest.raises(DataError) as e:
        open_image(path)
    message = str(e.value)
    assert str(path) in message and BAD[name][1] in message and "\n" not in message


def test_images_above_max_image_pixels_are_refused_before_decoding(tmp_path, monkeypatch):
    (path,) = write_corpus(tmp_path, ["rgb.png"])  # 42 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 41)
    with pytest.raises(DataError, match=r"7x6 pixels is more than PIL.Image.MAX_IMAGE_PIXELS = 41"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 42)
    assert open_image(path).size == (7, 6)


def _folder_dataset(root: Path, policy: str) -> ImageFolderDataset:
    write_corpus(root / "birds", sorted(GOOD))
    write_corpus(root / "bad birds", [*sorted(BAD), "rgb.png"])
    Image.fromarray(RGB).save(root / "bad birds" / "gone.png")
    data = ImageFolderDataset(root, transform=lambda img: torch.from_numpy(np.asarray(img.resize((8, 8))).copy()))
    (root / "bad birds" / "gone.png").unlink()  # deleted after indexing
    return data.set_bad_image_policy(policy)


def test_error_policy_names_the_file_also_from_a_worker(tmp_path):
    data = _folder_dataset(tmp_path, "error")
    bad = {Path(p).name for p in data.paths if Path(p).name in BAD or Path(p).name == "gone.png"}
    for i, path in enumerate(data.paths):
        if path.name in bad:
            with pytest.raises(DataError, match=str(path).replace("(", r"\(")):
                data[i]
    model = build_model("timm:test_resnet", 8)
    data.transform = lambda img: torch.from_numpy(
        np.asarray(img.resize((16, 16)), dtype=np.float32).transpose(2, 0, 1).copy()
    )
    with pytest.raises(DataError) as e:  # the evaluation's embedding loop
        embed_fields(model, data, fields=("embedding",), batch_size=4, num_workers=2)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    assert "in DataLoader worker process" in message and any(name in message for name in bad)


def test_skip_policy_leaves_bad_images_out_and_counts_them(tmp_path, caplog):
    data = _folder_dataset(tmp_path, "skip")
    with caplog.at_level(logging.WARNING, logger="glassmetric.data"):
        batches = list(DataLoader(data, batch_size=4, num_workers=0, collate_fn=collate_readable))
    assert sum(int(b["skipped"]) for b in batches) == len(BAD) + 1
    read = torch.cat([b["index"] for b in batches if "index" in b]).tolist()
    assert [data.paths[i].name for i in read] == [
        p.name for p in data.paths if p.name not in BAD and p.name != "gone.png"
    ]
    skipped = [r.getMessage() for r in caplog.records if "skipping an unreadable image" in r.getMessage()]
    assert sorted(
        Path(m.split("image ", 2)[-1].split(":")[0]).name if "not found" not in m else "gone.png" for m in skipped
    ) == sorted([*BAD, "gone.png"])


def _write_folder_split(root: Path, classes: int, per_class: int, seed: int, prefix: str | None = None) -> None:
    """``classes`` class folders named ``<prefix> class <c>`` (prefix: the root's name)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for i in range(per_class):
            path = root / f"{prefix or root.name} class {c}" / f"img {i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_cli_fit_with_bad_images_and_workers(tmp_path, policy):
    train, test = tmp_path / "train", tmp_path / "test"
    _write_folder_split(train, 4, 6, 0)
    _write_folder_split(test, 2, 4, 1)
    write_corpus(train / "train class 0", ["truncated.jpg", "text.png"])
    write_corpus(test / "test class 1", ["empty.jpg"])
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "glassmetric.cli",
        "fit",
        "--config",
        "demo_scratch",
        "data.name=folder",
        f"data.root={train}",
        f"data.test_root={test}",
        "data.val_classes=0",
        "trainer.select=last",
        "data.image_size=16",
        "data.resize=16",
        "data.num_workers=2",
        f"data.on_bad_image={policy}",
        "model.backbone=timm:test_resnet",
        "model.embedding_dim=8",
        "trainer.batch_size=8",
        "trainer.samples_per_class=2",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        f"trainer.output_dir={out}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if policy == "error":
        assert run.returncode == 2, run.stderr[-2000:]
        lines = run.stderr.strip().splitlines()
        assert "Traceback" not in run.stderr
        assert (
            lines[-1].startswith("glassmetric fit: error: cannot read image ")
            and "in DataLoader worker process" in lines[-1]
        )
        assert "truncated.jpg" in lines[-1] or "text.png" in lines[-1]
    else:
        assert run.returncode == 0, run.stderr[-2000:]
        with open(out / "logs" / "version_0" / "metrics.csv") as f:
            skipped = [float(r["data/skipped_images"]) for r in csv.DictReader(f) if r.get("data/skipped_images")]
        labels = ImageFolderDataset(train).labels  # the sampler's draws, independently
        sampler = MPerClassBatchSampler(labels, 2, 8, seed=0)
        bad = {i for i, p in enumerate(ImageFolderDataset(train).paths) if p.name in ("truncated.jpg", "text.png")}
        assert skipped == [float(sum(i in bad for batch in sampler for i in batch))]
        assert "empty.jpg" in run.stderr and (
            skipped[0] == 0 or "truncated.jpg" in run.stderr or "text.png" in run.stderr
        )
        assert skipped[0] == 0 or f"epoch 0: skipped {skipped[0]:.0f} unreadable training image(s)" in run.stderr
        assert "embedding: skipped 1 unreadable image(s) of 9" in run.stderr


def _elongated_png(path: Path, width: int, height: int) -> int:
    """A grey PNG of width x height pixels (small on disk however long); returns its bytes."""
    Image.new("L", (width, height), 128).save(path)
    return path.stat().st_size


@pytest.mark.parametrize("size", [(1, 1_000_000), (100_000, 1), (250, 2)])
def test_elongated_images_are_refused_from_the_header(tmp_path, monkeypatch, size):
    """Evaluation scales the shorter side to data.resize: a 1 x 1,000,000 image (4 KB on disk)
    would become 256 x 256,000,000 pixels. More than 100 : 1 is refused before decoding."""
    path = tmp_path / "strip.png"
    _elongated_png(path, *size)
    _elongated_png(tmp_path / "ok.png", 200, 2)  # 100 : 1, the largest ratio read
    _elongated_png(tmp_path / "ok tall.png", 3, 300)
    assert open_image(tmp_path / "ok.png").size == (200, 2) and open_image(tmp_path / "ok tall.png").size == (3, 300)

    def no_decoding(self, *args):
        raise AssertionError("decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(DataError) as e:
        open_image(path)
    message = str(e.value)
    assert str(path) in message and f"{size[0]}x{size[1]} pixels" in message and "100 times" in message
    assert "\n" not in message


def test_eval_explain_and_report_refuse_an_elongated_image_in_bounded_memory(tmp_path):
    """A 1 x 1,000,000 PNG among the images: ``eval`` and ``report`` skip it under
    ``data.on_bad_image: skip`` and name it on one line under ``error``, ``explain`` names it;
    nothing grows by more than 1.5 GB (resized it would be 64 x 64,000,000 pixels, 12 GB)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "explain"))
    import tiny_runs

    checkpoint = tiny_runs.fit_tiny(tmp_path / "run")
    for folder in ("query", "gallery"):  # the same classes on both sides
        _write_folder_split(tmp_path / folder, 2, 3, 0, prefix="bird")
    strip = tmp_path / "gallery" / "bird class 1" / "strip.png"
    assert _elongated_png(strip, 1, 1_000_000) < 5000
    fine = tmp_path / "query" / "bird class 0" / "img 0.png"
    pair = ["--query", str(tmp_path / "query"), "--gallery", str(tmp_path / "gallery")]
    runs = {
        "eval error": ["eval", "--checkpoint", str(checkpoint), *pair],
        "eval skip": ["eval", "--checkpoint", str(checkpoint), *pair, "data.on_bad_image=skip"],
        "report skip": [
            "report",
            "--checkpoint",
            str(checkpoint),
            *pair,
            "-o",
            str(tmp_path / "report"),
            "--queries",
            "1",
            "--top",
            "3",
            "data.on_bad_image=skip",
        ],
        "explain": [
            "explain",
            str(fine),
            str(strip),
            "--checkpoint",
            str(checkpoint),
            "-o",
            str(tmp_path / "pair.png"),
        ],
    }
    code = (
        "import contextlib, io, json, sys\n"
        "import glassmetric.cli, glassmetric.report, glassmetric.explain.panels, glassmetric.retrieval.evaluate\n"
        "cap()\n"
        f"runs = {runs!r}\n"
        "out = {}\n"
        "for name, argv in runs.items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            rc = glassmetric.cli.main(argv)\n"
        "        except BaseException as e:\n"
        "            rc = repr(e)\n"
        "    out[name] = (rc, err.getvalue())\n"
        "print(json.dumps(out))\n"
    )
    run = run_capped(code, 3 * 2**29)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("eval error", "explain"):
        rc, err = out[name]
        command = name.split()[0]
        last = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err, (name, rc, err[-2000:])
        assert last.startswith(f"glassmetric {command}: error: cannot read image {strip}: 1x1000000 pixels"), last
    for name in ("eval skip", "report skip"):
        rc, err = out[name]
        assert rc == 0 and "Traceback" not in err, (name, rc, err[-2000:])
        assert f"skipping an unreadable image (data.on_bad_image: skip): cannot read image {strip}" in err
    assert (tmp_path / "report" / "index.html").is_file()
