"""What the web explorer computes, independent of HTTP: embed a query, search the gallery,
score and explain its results, the uncertainty of an image.

Queries are named by ids: ``g<i>`` for gallery image ``i``, ``u<hash>`` for an uploaded image.
An upload is kept in a most-recently-used store, so its results can be explained later, as
what later requests need: its embeddings and the image as the model sees it (resized and
centre-cropped: ``image_size`` x ``image_size`` RGB pixels, whatever the upload's size); the
store holds at most ``recent`` uploads and ``upload_store_bytes`` bytes. Figures are cached the same way.
Methods are safe to call from several threads.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from glassmetric.data.transforms import normalisation
from glassmetric.errors import ConfigError, GlassmetricError
from glassmetric.explain.frames import FramedImage, framed
from glassmetric.explain.pair import explain_views, model_view
from glassmetric.explain.panels import pair_figures, pair_summary
from glassmetric.report.build import report_fields
from glassmetric.report.rankings import as_embeddings, rank_moves, rerank_query
from glassmetric.retrieval.shortlist import score_shortlist
from glassmetric.retriever import Retriever
from glassmetric.retriever.embeddings import Embeddings
from glassmetric.serve.gallery import Gallery, folder_source, load_gallery, split_source
from glassmetric.serve.limits import RequestError
from glassmetric.serve.search import ExactSearch, GallerySearch, IndexSearch, top_k

__all__ = ["RANKINGS", "Explorer", "UnknownQuery"]

#: the explorer's orderings: by the global cosine, or by cos + SS after structural re-ranking
RANKINGS = ("global", "structural")


class UnknownQuery(GlassmetricError):
    """A query or gallery id the explorer does not know (any more)."""


#: a gallery id: ``g`` and up to 12 ASCII digits (``str.isdigit`` also accepts superscripts
#: and digit strings longer than ``int()`` converts)
_GALLERY_ID = re.compile(r"g([0-9]{1,12})")


class _Recent:
    """A bounded most-recently-used mapping, guarded by a lock: at most ``size`` items and, when
    ``max_bytes`` is given, at most that many bytes (``nbytes`` of each value), though always the
    newest item."""

    def __init__(self, size: int, max_bytes: int | None = None, nbytes: Callable[[Any], int] = lambda v: 0):
        self.size, self.max_bytes, self.nbytes = size, max_bytes, nbytes
        self.items: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock, self.total_bytes = threading.Lock(), 0

    def _over(self) -> bool:
        return len(self.items) > self.size or (self.max_bytes is not None and self.total_bytes > self.max_bytes)

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
            return self.items.get(key)

    def put(self, key, value):
        with self.lock:
            if key in self.items:
                self.total_bytes -= self.nbytes(self.items[key])
            self.items[key] = value
            self.total_bytes += self.nbytes(value)
            self.items.move_to_end(key)
            while len(self.items) > 1 and self._over():
                self.total_bytes -= self.nbytes(self.items.popitem(last=False)[1])


@dataclass
class _Query:
    view: Callable[[], Image.Image]  # the image as the model sees it (model_view); made when shown or explained
    fields: dict[str, torch.Tensor]  # (1, ...) embeddings
    index: int | None  # gallery index when picked from the gallery


def _upload_bytes(q: _Query) -> int:
    """What an upload holds in the store: its view's pixels and its embeddings."""
    view = q.view()
    return view.width * view.height * len(view.getbands()) + sum(
        t.numel() * t.element_size() for t in q.fields.values()
    )


class Explorer:
    def __init__(
        self,
        retriever: Retriever,
        gallery: Gallery,
        search: GallerySearch | None = None,
        *,
        fields: tuple[str, ...],
        checkpoint: str = "",
        recent: int = 64,
        upload_store_bytes: int = 64 * 2**20,
    ):
        self.retriever, self.gallery, self.fields = retriever, gallery, fields
        self.model, self.cfg, self.device = retriever.model, retriever.cfg, retriever.device
        self.search_index = search or ExactSearch(gallery.fields["embedding"])
        self.checkpoint = checkpoint
        self.normalise = normalisation(self.model.backbone.mean, self.model.backbone.std)
        self.uploads, self.figures = _Recent(recent, upload_store_bytes, _upload_bytes), _Recent(4 * recent)
        self._embeddings: Embeddings | None = None

    @classmethod
    def open(
        cls,
        checkpoint: str,
        gallery_root: str | Path | None = None,
        *,
        split: str = "test",
        cache_dir=None,
        device: str = "cpu",
        progress: bool = True,
        knn: str = "exact",
        index_dir: str | Path | None = None,
        overrides: Sequence[str] = (),
        upload_store_bytes: int = 64 * 2**20,
    ) -> Explorer:
        """Load the checkpoint and embed (or load the cached embeddings of) the gallery folder,
        or without one the ``split`` of the checkpoint's own data. An unreadable gallery image (a
        dangling link included) raises or is left out as the checkpoint's ``data.on_bad_image`` says.

        ``knn="index"`` (or an ``index_dir``) searches a faiss gallery index, shaped by the
        checkpoint's ``eval.index`` settings (``overrides`` such as ``eval.index.kind=hnsw``),
        read from ``index_dir`` when it holds one for this gallery, else built (and saved there).
        """
        from glassmetric.retrieval.evaluate import cached_gallery_index

        if knn not in ("exact", "index"):
            raise ConfigError(f"knn: expected 'exact' or 'index', got {knn!r}")
        retriever = Retriever.from_checkpoint(checkpoint, device, list(overrides))
        cfg, fields = retriever.cfg, report_fields(retriever)
        source = folder_source(gallery_root) if gallery_root is not None else split_source(retriever, split)
        source.dataset.set_bad_image_policy(cfg.data.on_bad_image)
        gallery = load_gallery(
            retriever.model, cfg, checkpoint, source, fields, cache_dir=cache_dir, device=device, progress=progress
        )
        search = None
        if knn == "index" or index_dir is not None:
            search = IndexSearch(cached_gallery_index(gallery.fields["embedding"], cfg.eval.index, index_dir))
        return cls(
            retriever, gallery, search, fields=fields, checkpoint=str(checkpoint), upload_store_bytes=upload_store_bytes
        )

    # ------------------------------------------------------------------------------ queries
    @torch.inference_mode()
    def _embed(self, view: Image.Image) -> dict[str, torch.Tensor]:
        out = self.model(self.normalise(view)[None].to(self.device))
        return {name: getattr(out, name).float().cpu() for name in self.fields}

    def add_upload(self, image: Image.Image) -> str:
        """Embed an uploaded image (read by :func:`glassmetric.serve.limits.read_upload`) and
        return its query id; the store keeps its embeddings and view, not the image."""
        digest = hashlib.sha256(repr(image.size).encode())
        for row in range(0, image.height, 256):  # a strip at a time: no second full copy of the pixels
            digest.update(image.crop((0, row, image.width, min(row + 256, image.height))).tobytes())
        qid = f"u{digest.hexdigest()[:16]}"
        if self.uploads.get(qid) is None:
            view = model_view(self.cfg, image)
            self.uploads.put(qid, _Query(view=lambda: view, fields=self._embed(view), index=None))
        return qid

    def gallery_index(self, gid: str) -> int:
        m = _GALLERY_ID.fullmatch(gid)
        if m is None or int(m[1]) >= len(self.gallery):
            shown = gid if len(gid) <= 40 else f"{gid[:40]}... ({len(gid)} characters)"
            raise UnknownQuery(f"unknown gallery image {shown!r}: ids are g0 .. g{len(self.gallery) - 1}")
        return int(m[1])

    def query(self, qid: str) -> _Query:
        if qid.startswith("u"):
            q = self.uploads.get(qid)
            if q is None:
                raise UnknownQuery(
                    f"unknown upload {qid!r} (the last {self.uploads.size} uploads are kept, "
                    f"at most {self.uploads.max_bytes} bytes)"
                )
            return q
        i = self.gallery_index(qid)
        return _Query(
            view=lambda: model_view(self.cfg, self.gallery.image(i)),
            index=i,
            fields={k: v[i : i + 1] for k, v in self.gallery.fields.items()},
        )

    def view_png(self, qid: str) -> bytes:
        """The query or gallery image as the model sees it, as PNG."""
        buffer = io.BytesIO()
        self.query(qid).view().save(buffer, format="PNG")
        return buffer.getvalue()

    # ------------------------------------------------------------------------------ answers
    def item(self, i: int) -> dict:
        return {"id": f"g{i}", "name": self.gallery.name(i), "class": self.gallery.class_name(i)}

    def _gallery_embeddings(self) -> Embeddings:
        if self._embeddings is None:
            self._embeddings = as_embeddings(self.gallery.fields)
        return self._embeddings

    def search(self, qid: str, k: int, rerank: str = "global", rerank_k: int | None = None) -> dict:
        """The ``k`` best gallery images for query ``qid`` with their scores (and, for a query
        picked from a labelled gallery, whether each is of its class).

        ``rerank="global"`` orders them by the global cosine; ``"structural"`` by ``cos + SS``
        after re-ranking the global top-``rerank_k`` (default ``k``, at least ``k``), the
        computation of ``glassmetric eval --rerank structural --k K``
        (:func:`glassmetric.report.rankings.rerank_query`). Each result carries ``score``, the
        value that ordered it, its ``global_rank`` and ``move`` (global rank minus rank).
        """
        if rerank not in RANKINGS:
            raise RequestError(422, f"rerank: expected one of {', '.join(RANKINGS)}, got {rerank!r}")
        structural = rerank == "structural"
        shortlist = k if rerank_k is None else rerank_k
        if structural and "local" not in self.fields:
            raise GlassmetricError("rerank=structural: this model gives no local embeddings to re-rank with")
        if structural and shortlist < k:
            raise RequestError(422, f"rerank_k: expected rerank_k >= k ({k}), got {shortlist}")
        q = self.query(qid)
        _, g_idx = top_k(self.search_index, q.fields["embedding"], shortlist if structural else k, q.index)
        global_order = g_idx.tolist()
        if structural:
            index = self.search_index.index if isinstance(self.search_index, IndexSearch) else None
            try:
                ranked = rerank_query(
                    self.retriever,
                    as_embeddings(q.fields),
                    self._gallery_embeddings(),
                    k=shortlist,
                    n=k,
                    exclude=q.index,
                    index=index,
                )
            except ValueError as err:  # an approximate index that found too few candidates
                raise GlassmetricError(str(err)) from None
            idx = ranked.indices[0].cpu()
        else:
            idx = g_idx[:k]
        ot = self.retriever.settings
        scored = score_shortlist(
            q.fields,
            self.gallery.fields,
            idx[None],
            epsilon=ot.epsilon,
            iters=ot.iters,
            tol=ot.tol,
            marginals=ot.marginals,
            introspective=self.retriever.introspective,
        )
        rows = idx.tolist()
        moves = rank_moves(rows, global_order)
        same = self._same_images(q, rows, scored.global_scores[0].tolist())
        results = []
        for r, (gi, scores) in enumerate(zip(rows, scored.scores(0), strict=True)):
            if structural:  # the re-ranking's own scores: the ones that ordered the results
                scores["global"] = float(ranked.global_scores[0, r])
                scores["structural"] = float(ranked.structural_scores[0, r])
                scores["multiscale"] = float(ranked.scores[0, r])
            correct = None
            if q.index is not None and self.gallery.labelled:
                correct = bool(self.gallery.labels[gi] == self.gallery.labels[q.index])
            move = moves[r]
            results.append(
                {
                    "rank": r + 1,
                    **self.item(gi),
                    "correct": correct,
                    "score": scores["multiscale" if structural else "global"],
                    "global_rank": None if move is None else r + 1 + move,
                    "move": move,
                    "same_image": gi in same,
                    "scores": scores,
                }
            )
        return {
            "query": qid,
            "query_class": None if q.index is None else self.gallery.class_name(q.index),
            "uncertainty": None if scored.query_uncertainty is None else float(scored.query_uncertainty[0]),
            "ranking": {
                "method": rerank,
                "k": shortlist if structural else 0,
                "ordered_by": "multiscale" if structural else "global",
            },
            "results": results,
        }

    def _same_images(self, q: _Query, rows: list[int], cosines: list[float]) -> set[int]:
        """The gallery rows whose image, as the model sees it, is the uploaded query's, pixel for
        pixel (only rows at cosine 0.999 or more are compared)."""
        if q.index is not None:
            return set()
        close = [gi for gi, c in zip(rows, cosines, strict=True) if c >= 0.999]
        if not close:
            return set()
        view = np.asarray(q.view())
        return {gi for gi in close if np.array_equal(np.asarray(model_view(self.cfg, self.gallery.image(gi))), view)}

    def uncertainty(self, qid: str) -> float | None:
        """``||u||`` of the query image; None when the model has no uncertainty head."""
        u = self.query(qid).fields.get("uncertainty")
        return None if u is None else float(u.float().norm())

    def _figures(self, qid: str, gid: str) -> tuple[list[str], dict[str, bytes]]:
        key = (qid, gid)
        cached = self.figures.get(key)
        if cached is None:
            q, gi = self.query(qid), self.gallery_index(gid)
            result_image = self.gallery.image(gi)
            # the figures draw the photos at their own size; an upload keeps only its model view
            if q.index is not None:
                query_original = framed(self.cfg, self.gallery.image(q.index))
            else:
                view = q.view()
                query_original = FramedImage(view, (0.0, 0.0, float(view.width), float(view.height)))
            pair = explain_views(
                self.model,
                self.cfg,
                q.view(),
                model_view(self.cfg, result_image),
                introspective=self.retriever.introspective,
                originals=(query_original, framed(self.cfg, result_image)),
            )
            pngs = {}
            for kind, fig in pair_figures(pair, ("query", self.gallery.name(gi))).items():
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=90, facecolor="white")
                pngs[kind] = buffer.getvalue()
            cached = (pair_summary(pair), pngs)
            self.figures.put(key, cached)
        return cached

    def explain(self, qid: str, gid: str) -> dict:
        """Why gallery image ``gid`` came back for query ``qid``: the explanation in words and
        the URLs of its figures."""
        lines, pngs = self._figures(qid, gid)
        figures = {kind: f"/api/explain/figure?query={qid}&result={gid}&kind={kind}" for kind in pngs}
        return {"query": qid, "result": self.item(self.gallery_index(gid)), "lines": lines, "figures": figures}

    def figure_png(self, qid: str, gid: str, kind: str) -> bytes:
        _, pngs = self._figures(qid, gid)
        if kind not in pngs:
            raise UnknownQuery(f"no {kind!r} figure for this model: it has {sorted(pngs)}")
        return pngs[kind]

    def info(self) -> dict:
        heads = sorted(self.model.extra_heads)
        return {
            "checkpoint": self.checkpoint,
            "gallery": self.gallery.source.description,
            "gallery_size": len(self.gallery),
            "labelled": self.gallery.labelled,
            "classes": len(np.unique(self.gallery.labels)) if self.gallery.labelled else 0,
            "fields": list(self.fields),
            "rankings": list(RANKINGS) if "local" in self.fields else ["global"],
            "heads": heads,
            "embedding_cache": str(self.gallery.cache_file),
            "from_cache": self.gallery.from_cache,
        }
