"""The one front door for inference: load a model, embed images, search, re-rank, explain, evaluate.

Every inference path of glassmetric (``glassmetric eval | explain | report | serve | export |
embed``, the Python API) goes through :class:`Retriever`; none of them imports the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from glassmetric.checkpoints import load_trained
from glassmetric.config import Config, load_config
from glassmetric.data.base import RetrievalDataset
from glassmetric.data.image_io import open_image
from glassmetric.errors import ConfigError
from glassmetric.explain.pair import PairExplanation, explain_images
from glassmetric.factory import (
    build_model_from_config,
    eval_transform,
    evaluation_recall_ks,
    introspective_params,
    make_splits,
)
from glassmetric.models.embedding_model import EmbeddingModel
from glassmetric.retrieval.embed import embed_fields
from glassmetric.retrieval.evaluate import cached_gallery_index, default_device, evaluate_model, evaluate_rerank_sweep
from glassmetric.retrieval.knn import knn
from glassmetric.retrieval.rerank import RerankResult, structural_rerank
from glassmetric.retriever.embeddings import Embeddings
from glassmetric.retriever.model import InferenceModel
from glassmetric.retriever.sources import ImageSource, as_dataset, eval_datasets
from glassmetric.similarity.ot_settings import OTSettings

__all__ = ["Retriever"]


class Retriever:
    """A model and its config, ready for inference.

    ``model`` is an :class:`~glassmetric.retriever.model.InferenceModel`: it gives the
    ``fields`` the model has (global embedding always; local cells, training-free when the model
    has no spatial head; group embeddings and attention; uncertainty), decided once here. The
    model itself is never changed. ``settings`` are the OT settings of structural matching
    (:meth:`OTSettings.from_config`, with ``structural.tol`` early stopping).
    """

    def __init__(
        self,
        model: EmbeddingModel,
        cfg: Config,
        *,
        device: str | torch.device | None = None,
        checkpoint: str | Path | None = None,
    ):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else default_device()
        self.model = InferenceModel(model, cfg.model.spatial_grid or 4).eval().to(self.device)
        self.settings = OTSettings.from_config(cfg)
        self.introspective = introspective_params(cfg)
        self.checkpoint = None if checkpoint is None else str(checkpoint)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None, overrides: Sequence[str] = ()
    ) -> Retriever:
        """The model of a ``glassmetric fit`` checkpoint; ``overrides`` (``key=value``) change its
        stored config (not ``model.*``, which the weights fix)."""
        model, cfg = load_trained(path, list(overrides))
        return cls(model, cfg, device=device, checkpoint=path)

    @classmethod
    def from_preset(
        cls, name: str, overrides: Sequence[str] = (), device: str | torch.device | None = None
    ) -> Retriever:
        """The untrained model of a preset or YAML config (e.g. ``cub50``: ImageNet features and a
        random embedding head), for a baseline without training."""
        cfg = load_config(name, list(overrides))
        return cls(build_model_from_config(cfg), cfg, device=device)

    @property
    def fields(self) -> tuple[str, ...]:
        """The embedding fields the model gives (names of :class:`Embeddings` fields)."""
        return self.model.fields

    @property
    def transform(self):
        """The evaluation transform: resize, centre crop, normalisation of the backbone."""
        return eval_transform(self.cfg, self.model)

    # ------------------------------------------------------------------ embedding
    def dataset(self, source: ImageSource) -> RetrievalDataset:
        """``source`` (a data set, a folder, image files, PIL images) as a data set with the
        evaluation transform and the config's bad-image policy."""
        data = as_dataset(source, self.transform)
        if not isinstance(source, RetrievalDataset):
            data.set_bad_image_policy(self.cfg.data.on_bad_image)
        return data

    def embed(
        self, source: ImageSource | Embeddings, *, fields: Sequence[str] | None = None, progress: bool = False
    ) -> Embeddings:
        """Every embedding the model gives (or the global one and ``fields``) for ``source``: a
        :class:`RetrievalDataset`, an image folder (one sub-folder per class, or just images),
        an image file, a PIL image, or a list of files or images. Embeddings pass through."""
        if isinstance(source, Embeddings):
            return source
        data = self.dataset(source)
        names = (
            tuple(dict.fromkeys(("embedding", *fields))) if fields is not None else self.fields
        )  # always the global one
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise ConfigError(f"the model gives no {', '.join(missing)} embeddings (it gives {', '.join(self.fields)})")
        out = embed_fields(
            self.model,
            data,
            fields=names,
            batch_size=self.cfg.eval.batch_size,
            num_workers=self.cfg.data.num_workers,
            device=self.device,
            progress=progress,
        )
        paths = getattr(data, "paths", None)
        return Embeddings(
            **{n: out[n] for n in names},
            labels=out["labels"],
            positions=out["index"],
            paths=None if paths is None else [str(paths[i]) for i in out["index"].tolist()],
        )

    # ------------------------------------------------------------------ search
    def search(
        self, query: ImageSource | Embeddings, gallery: ImageSource | Embeddings | None = None, k: int = 10, index=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cosines (Q, k), gallery rows (Q, k))`` of each query's ``k`` nearest gallery images by
        the global embedding; ``gallery`` None searches the queries against themselves, each
        query left out of its own results. ``index``: a :class:`GalleryIndex` over the gallery."""
        q = self.embed(query, fields=("embedding",) if not isinstance(query, Embeddings) else None)
        g = (
            q
            if gallery is None
            else self.embed(gallery, fields=("embedding",) if not isinstance(gallery, Embeddings) else None)
        )
        return knn(
            q.embedding,
            g.embedding,
            k,
            exclude_self=gallery is None,
            backend="index" if index is not None else "torch",
            index=index,
        )

    def rerank(
        self,
        query: ImageSource | Embeddings,
        gallery: ImageSource | Embeddings | None = None,
        *,
        method: str = "structural",
        k: int = 100,
        n_neighbours: int | None = None,
        settings: OTSettings | None = None,
        index=None,
    ) -> RerankResult:
        """Each query's global top-``k`` re-ranked by the multi-scale score ``cos + SS`` (DIML,
        Zhao et al. 2021, Eq. 9), with ``settings`` (default: the config's). ``gallery`` None:
        the queries against themselves, each left out of its own results."""
        if method != "structural":
            raise ConfigError(f"re-ranking method {method!r}: the one method is 'structural'")
        self.model.require_local()
        q, g = self.embed(query), None if gallery is None else self.embed(gallery)
        if q.local is None or (g is not None and g.local is None):  # Embeddings passed in without their local cells
            raise ConfigError("re-ranking needs the local embeddings: embed with the 'local' field")
        ot = settings or self.settings
        return structural_rerank(
            query_global=q.embedding.to(self.device),
            query_local=q.local.to(self.device),
            gallery_global=None if g is None else g.embedding.to(self.device),
            gallery_local=None if g is None or g.local is None else g.local.to(self.device),
            k=k,
            n_neighbours=n_neighbours,
            epsilon=ot.epsilon,
            iters=ot.iters,
            tol=ot.tol,
            marginals=ot.marginals,
            index=index,
        )

    # ------------------------------------------------------------------ explanation
    def explain(self, image_a: Image.Image | str | Path, image_b: Image.Image | str | Path) -> PairExplanation:
        """Why two images (PIL images or files) are alike, in every way the model can say:
        structural decomposition (transport plan, contributions), per-group cosines and
        attention, introspective scores."""
        a, b = (im if isinstance(im, Image.Image) else open_image(im) for im in (image_a, image_b))
        return explain_images(self.model, self.cfg, a, b, introspective=self.introspective)

    # ------------------------------------------------------------------ evaluation
    def eval_data(
        self, *, split: str = "test", query: str | None = None, gallery: str | None = None, folder: str | None = None
    ) -> tuple[str, RetrievalDataset, RetrievalDataset | None]:
        """``(description, queries, gallery or None)``: ``folder`` searched against itself (also
        when ``query`` and ``gallery`` are one folder), ``query`` against ``gallery``, or the
        ``split`` of the config's data (see :func:`~glassmetric.retriever.sources.eval_datasets`)."""
        splits = make_splits(self.cfg, self.model) if not (folder or query) else None
        return eval_datasets(
            self.cfg, self.transform, split=split, query=query, gallery=gallery, folder=folder, splits=splits
        )

    def evaluate(
        self,
        dataset: RetrievalDataset | str | Path,
        gallery: RetrievalDataset | str | Path | None = None,
        *,
        rerank_ks: Sequence[int] = (),
        knn_backend: str | None = None,
        index_dir: str | Path | None = None,
        progress: bool = False,
    ):
        """Retrieval metrics (R@K, R-Precision, MAP@R, NMI) of ``dataset`` searched against itself
        (each query left out of its own results) or against ``gallery``. With ``rerank_ks``:
        ``{K: metrics}`` after structural re-ranking of each query's global top-K (K = 0: the
        global ranking)."""
        dataset = dataset if isinstance(dataset, RetrievalDataset) else self.dataset(dataset)
        if gallery is not None and not isinstance(gallery, RetrievalDataset):
            gallery = self.dataset(gallery)
        e = self.cfg.eval
        backend = "index" if index_dir else knn_backend or e.knn_backend
        kw: dict[str, Any] = {
            "batch_size": e.batch_size,
            "num_workers": self.cfg.data.num_workers,
            "knn_backend": backend,
            "device": self.device,
            "progress": progress,
            "index_settings": e.index,
            "index_dir": index_dir,
            "recall_ks": evaluation_recall_ks(self.cfg),
        }
        if not rerank_ks:
            return evaluate_model(self.model, dataset, gallery, max_k=e.knn_k, **kw)
        self.model.require_local()
        ot = self.settings
        return evaluate_rerank_sweep(
            self.model,
            dataset,
            gallery,
            ks=tuple(rerank_ks),
            epsilon=ot.epsilon,
            iters=ot.iters,
            tol=ot.tol,
            marginals=ot.marginals,
            **kw,
        )

    def gallery_index(self, gallery: Embeddings, index_dir: str | Path | None = None):
        """The faiss :class:`GalleryIndex` of ``gallery`` (shaped by ``eval.index``), cached in ``index_dir``."""
        return cached_gallery_index(gallery.embedding, self.cfg.eval.index, index_dir)
