"""Uploads: decoded exactly as gallery files are, refused when too elongated to resize, and
kept in the upload store as what later requests need, within its bytes."""

import gc
import io
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from memory_cap import run_capped
from PIL import Image
from serve_runs import fit_idml, write_gallery

from glassmetric.data.image_io import open_image
from glassmetric.explain.panels import pair_summary
from glassmetric.factory import eval_transform
from glassmetric.serve.explorer import Explorer, UnknownQuery
from glassmetric.serve.limits import Limits, read_upload


def _gray16(img: Image.Image, path: Path) -> None:
    gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray + np.random.default_rng(0).integers(0, 200, gray.shape, dtype=np.uint16)).save(path)


def _rgba(img: Image.Image, path: Path) -> None:
    alpha = np.random.default_rng(1).integers(0, 256, img.size[::-1], dtype=np.uint8)
    Image.fromarray(np.dstack([np.asarray(img), alpha]), "RGBA").save(path)


def _palette_alpha(img: Image.Image, path: Path) -> None:
    img.quantize(16).save(path, transparency=3)


def _exif_rotated(img: Image.Image, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.crop((0, 0, 64, 40)).save(path, exif=exif, quality=95)


#: file name -> writer of a gallery image in that mode, made from a plain RGB gallery image
MODES = {
    "gray16.png": _gray16,
    "rgba.png": _rgba,
    "palette alpha.png": _palette_alpha,
    "exif rotated.jpg": _exif_rotated,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(root, checkpoint, {mode file name: path})``: a tiny IDML run and a gallery folder with
    one image of each mode among 8 plain ones."""
    root = tmp_path_factory.mktemp("uploads")
    paths = write_gallery(root / "gallery", 12)
    modes = {}
    for (name, writer), path in zip(MODES.items(), paths[8:], strict=True):
        modes[name] = path.with_name(name)
        writer(Image.open(path).convert("RGB"), modes[name])
        path.unlink()
    return root, fit_idml(root / "run"), modes


@pytest.fixture(scope="module")
def explorer(files):
    root, checkpoint, _ = files
    return Explorer.open(str(checkpoint), root / "gallery", cache_dir=root / "cache", progress=False)


@pytest.mark.parametrize("name", sorted(MODES))
def test_an_upload_reads_as_its_file_in_the_gallery_and_finds_it_first(files, explorer, name):
    """16-bit grey, RGBA, palette with transparency, EXIF orientation: the uploaded bytes give
    the pixels and the embedding of the same file read from the gallery, and it comes back first."""
    root, _, modes = files
    path = modes[name]
    upload = read_upload(path.read_bytes(), Limits(), name)
    reference = Image.open(path)  # the file, read without glassmetric's decoder
    assert upload.size == (reference.size[::-1] if name.startswith("exif") else reference.size)
    np.testing.assert_array_equal(np.asarray(upload), np.asarray(open_image(path)))
    row = [explorer.gallery.name(i) for i in range(len(explorer.gallery))].index(
        path.relative_to(root / "gallery").as_posix()
    )
    qid = explorer.add_upload(upload)
    torch.testing.assert_close(
        explorer.query(qid).fields["embedding"], explorer.gallery.fields["embedding"][row : row + 1]
    )
    top = explorer.search(qid, 3)["results"][0]
    assert top["id"] == f"g{row}" and top["scores"]["global"] == pytest.approx(1.0, abs=1e-5)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def test_elongated_uploads_get_413_in_bounded_memory(files, explorer):
    """A 1 x 1,000,000 PNG (4 KB) and a 100,000 x 1 PNG are within the upload and pixel limits
    but resized they would take gigabytes: 413 naming the upload, the explorer growing by less
    than 1 GB, and it keeps serving."""
    root, checkpoint, _ = files
    tall, wide = _png(1, 1_000_000), _png(100_000, 1)
    assert len(tall) < 5000 and len(wide) < 1000
    (root / "tall.png").write_bytes(tall)
    (root / "wide.png").write_bytes(wide)
    code = (
        "import json\n"
        "from fastapi.testclient import TestClient\n"
        "from glassmetric.serve.app import create_app\n"
        "from glassmetric.serve.explorer import Explorer\n"
        f"explorer = Explorer.open({str(checkpoint)!r}, {str(root / 'gallery')!r}, cache_dir={str(root / 'cache')!r}, progress=False)\n"
        "client = TestClient(create_app(explorer), raise_server_exceptions=False, base_url='http://127.0.0.1')\n"
        "cap()\n"
        "out = []\n"
        f"for name in ('tall.png', 'wide.png'):\n"
        f"    data = open({str(root)!r} + '/' + name, 'rb').read()\n"
        "    res = client.post('/api/search', files={'image': (name, data, 'image/png')})\n"
        "    out.append([res.status_code, res.text])\n"
        "out.append([client.get('/api/search', params={'query': 'g0', 'k': 2}).status_code, ''])\n"
        "print(json.dumps(out))\n"
    )
    run = run_capped(code, 2**30)
    assert run.returncode == 0, run.stderr[-3000:]
    (tall_status, tall_text), (wide_status, wide_text), (after, _) = json.loads(run.stdout.strip().splitlines()[-1])
    assert tall_status == 413 and "tall.png: 1x1000000 pixels" in json.loads(tall_text)["detail"]
    assert wide_status == 413 and "wide.png: 100000x1 pixels" in json.loads(wide_text)["detail"]
    assert "100 times" in json.loads(tall_text)["detail"] and after == 200


def _images_held(obj, seen: set) -> list[Image.Image]:
    """The PIL images reachable from ``obj`` through containers, objects and closures (not
    through modules, classes or a function's globals)."""
    if id(obj) in seen or isinstance(obj, (type, types.ModuleType, torch.Tensor, str, bytes)):
        return []
    seen.add(id(obj))
    if isinstance(obj, Image.Image):
        return [obj]
    if isinstance(obj, types.FunctionType):
        children = [cell.cell_contents for cell in obj.__closure__ or ()]
    else:
        children = gc.get_referents(obj)
    return [img for child in children for img in _images_held(child, seen)]


def _large_upload(i: int) -> bytes:
    """A distinct 1200 x 1200 image (4.3 MB of pixels, about 10 KB as PNG)."""
    pixels = np.full((1200, 1200, 3), (40 + 15 * i, 120, 200 - 10 * i), dtype=np.uint8)
    pixels[::97, ::89] = np.random.default_rng(i).integers(0, 256, (13, 14, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_the_upload_store_keeps_small_views_within_its_bytes(files, explorer):
    """12 large uploads: the store holds each as its 64 x 64 view and embeddings (12 KB and the
    embedding bytes, not the 4.3 MB image), at most ``upload_store_bytes`` in all, dropping the
    oldest; what it keeps still explains a pair as the uploaded file itself does."""
    root, _checkpoint, modes = files
    model, cfg = explorer.model, explorer.cfg
    uploads = [_large_upload(i) for i in range(12)]
    assert max(len(u) for u in uploads) < 100_000
    images = [read_upload(data, Limits()) for data in uploads]
    with torch.inference_mode():  # an entry's bytes, counted independently: view pixels + the model's outputs
        out = model(eval_transform(cfg, model)(images[0])[None])
    entry = 64 * 64 * 3 + sum(getattr(out, f).numel() * 4 for f in explorer.fields)
    assert entry < 200_000

    store = Explorer(explorer.retriever, explorer.gallery, fields=explorer.fields, upload_store_bytes=3 * entry + 1000)
    qids = [store.add_upload(img) for img in images]
    assert len(set(qids)) == 12 and len(store.uploads.items) == 3 and store.uploads.total_bytes == 3 * entry
    assert list(store.uploads.items) == qids[-3:]
    assert all(img.size == (64, 64) for img in _images_held(store.uploads.items, set()))
    for qid in qids[:-3]:
        with pytest.raises(UnknownQuery, match="unknown upload"):
            store.search(qid, 2)
    assert store.search(qids[-1], 2)["results"][0]["rank"] == 1

    roomy = Explorer(explorer.retriever, explorer.gallery, fields=explorer.fields)  # the defaults: 64 uploads, 64 MiB
    kept = [roomy.add_upload(img) for img in images]
    assert len(roomy.uploads.items) == 12 and roomy.uploads.total_bytes == 12 * entry
    assert all(img.size == (64, 64) for img in _images_held(roomy.uploads.items, set()))

    path = modes["rgba.png"]
    qid = roomy.add_upload(read_upload(path.read_bytes(), Limits()))
    other = open_image(root / "gallery" / roomy.gallery.name(2))
    assert roomy.explain(qid, "g2")["lines"] == pair_summary(explorer.retriever.explain(open_image(path), other))
    expected_view = io.BytesIO()
    explorer.retriever.explain(open_image(path), other).images[0].save(expected_view, format="PNG")
    assert roomy.view_png(qid) == expected_view.getvalue()
    assert kept[0] in roomy.uploads.items


def test_serve_takes_the_upload_store_size(tmp_path, capsys, monkeypatch):
    from glassmetric.cli import main
    from glassmetric.errors import CheckpointError

    assert main(["serve", "--checkpoint", str(tmp_path / "none.ckpt"), "--upload-store-mb", "0"]) == 2
    assert "--upload-store-mb: expected a positive finite number, got 0.0" in capsys.readouterr().err
    seen = {}

    def opened(*args, **kwargs):
        seen.update(kwargs)
        raise CheckpointError("stop here")

    monkeypatch.setattr(Explorer, "open", opened)
    assert main(["serve", "--checkpoint", str(tmp_path / "none.ckpt"), "--port", "0", "--upload-store-mb", "16"]) == 2
    assert seen["upload_store_bytes"] == 16 * 2**20
