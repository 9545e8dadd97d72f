"""The gallery is embedded once: the cache is reused while nothing changed, renewed when it did."""

import os

import pytest
import torch
from PIL import Image
from serve_runs import fit_idml, write_gallery

from glassmetric.checkpoints import load_trained
from glassmetric.data.folder import ImageFolderDataset
from glassmetric.errors import DataError
from glassmetric.factory import eval_transform
from glassmetric.report.build import report_fields
from glassmetric.retrieval.embed import embed_fields
from glassmetric.retriever import Retriever
from glassmetric.serve.gallery import folder_source, load_gallery


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fit_idml(tmp_path_factory.mktemp("run"))


def test_cache_is_reused_until_the_gallery_changes(checkpoint, tmp_path):
    retriever = Retriever.from_checkpoint(checkpoint, "cpu")
    model, cfg, fields = retriever.model, retriever.cfg, report_fields(retriever)
    paths = write_gallery(tmp_path / "gallery", 8)

    def load():
        return load_gallery(
            model,
            cfg,
            checkpoint,
            folder_source(tmp_path / "gallery"),
            fields,
            cache_dir=tmp_path / "cache",
            progress=False,
        )

    first = load()
    assert not first.from_cache and first.cache_file.is_file()
    expected = embed_fields(
        model, ImageFolderDataset(tmp_path / "gallery", transform=eval_transform(cfg, model)), fields=fields
    )
    for name in fields:
        torch.testing.assert_close(first.fields[name], expected[name])
    assert first.labelled and first.class_name(0) == paths[0].parent.name and first.name(0) == "c04/00.png"
    again = load()
    assert again.from_cache and again.cache_file == first.cache_file
    for name in fields:
        torch.testing.assert_close(again.fields[name], first.fields[name])
    st = paths[3].stat()
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edited image
    changed = load()
    assert not changed.from_cache and changed.cache_file != first.cache_file


def test_a_folder_without_classes_is_an_unlabelled_gallery(tmp_path):
    (tmp_path / "flat").mkdir()
    for p in write_gallery(tmp_path / "g", 2):
        p.rename(tmp_path / "flat" / p.name)
    source = folder_source(tmp_path / "flat")
    assert source.class_names == () and source.names == ["00.png", "01.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        folder_source(tmp_path / "empty")


def test_rows_name_the_right_images_when_an_unreadable_one_is_skipped(checkpoint, tmp_path):
    """Under ``data.on_bad_image: skip`` a gallery row is not a data-set position: the rows
    after an unreadable image must still name, show and label their own image, from the cache
    too."""
    retriever = Retriever.from_checkpoint(checkpoint, "cpu")
    model, cfg, fields = retriever.model, retriever.cfg, report_fields(retriever)
    paths = write_gallery(tmp_path / "gallery", 6)
    paths[2].write_bytes(b"not an image")

    def load():
        source = folder_source(tmp_path / "gallery")
        source.dataset.set_bad_image_policy("skip")
        return load_gallery(model, cfg, checkpoint, source, fields, cache_dir=tmp_path / "cache", progress=False)

    order = ImageFolderDataset(tmp_path / "gallery").paths  # data-set positions
    bad = order.index(paths[2])
    readable = [p for p in order if p != paths[2]]
    for gallery in (load(), load()):
        assert len(gallery) == 5 and list(gallery.index) == [i for i in range(6) if i != bad]
        for row, path in enumerate(readable):
            assert gallery.name(row) == path.relative_to(tmp_path / "gallery").as_posix()
            assert gallery.class_name(row) == path.parent.name
            assert gallery.image(row).tobytes() == Image.open(path).convert("RGB").tobytes()
    assert gallery.from_cache


def test_the_cache_follows_the_evaluation_transform_and_the_bad_image_policy(checkpoint, tmp_path):
    """``data.*`` overrides that change the embeddings or the rows (``data.resize``,
    ``data.on_bad_image``) get their own cache file, not the embeddings of other settings."""
    from torchvision import transforms as T

    from glassmetric.serve.explorer import Explorer

    paths = write_gallery(tmp_path / "gallery", 8)

    def open_(*overrides):
        return Explorer.open(
            str(checkpoint),
            tmp_path / "gallery",
            cache_dir=tmp_path / "cache",
            progress=False,
            overrides=list(overrides),
        ).gallery

    default = open_()
    resized = open_("data.resize=96")
    assert not resized.from_cache and resized.cache_file != default.cache_file
    model, _ = load_trained(str(checkpoint))
    reference = T.Compose(
        [T.Resize(96), T.CenterCrop(64), T.ToTensor(), T.Normalize(model.backbone.mean, model.backbone.std)]
    )
    expected = embed_fields(model, ImageFolderDataset(tmp_path / "gallery", transform=reference), fields=("embedding",))
    torch.testing.assert_close(resized.fields["embedding"], expected["embedding"])
    assert (resized.fields["embedding"] - default.fields["embedding"]).abs().max() > 1e-3  # the settings matter
    assert open_("data.resize=96").from_cache and open_().from_cache

    paths[5].write_bytes(b"not an image")
    os.utime(paths[5], ns=(0, 0))  # the same fingerprint for every policy below
    skipped = open_("data.on_bad_image=skip")
    assert len(skipped) == 7 and not skipped.from_cache
    with pytest.raises(DataError, match=str(paths[5])):  # not the 7 rows cached under skip
        open_()
    assert open_("data.on_bad_image=skip").from_cache
