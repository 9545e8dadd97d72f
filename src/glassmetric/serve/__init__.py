"""The local web explorer (``glassmetric serve``): a FastAPI app over a gallery folder.

:mod:`.gallery` embeds the gallery once and caches it on disk; :mod:`.search` is the small
interface the gallery search sits behind (exact kNN or a faiss gallery index);
:mod:`.explorer` answers queries without HTTP; :mod:`.limits` holds the input limits;
:mod:`.app` the FastAPI app and :mod:`.page` its page; :mod:`.server` runs it for
``glassmetric serve``. Imported by their own paths.
"""
