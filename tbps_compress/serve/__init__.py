"""tbps_compress.serve: ``tbps-compress serve``, a torch-free person-search service over HTTP.

- :mod:`.service` (:class:`GalleryService`): the ONNX encoder (one onnxruntime session per tower, shared by all
  requests) and the gallery index (:class:`~tbps_compress.retrieval.index.GalleryIndex`: FAISS vectors + SQLite
  metadata, built incrementally at start). Searches run in parallel on an immutable in-memory snapshot of the index;
  an upload or deletion builds the next snapshot (new files embedded, the index saved to disk) beside it and swaps it
  in under a lock held only for the swap.
- :mod:`.app` (:func:`create_app`): the FastAPI application: ``POST /search``, ``POST /gallery``,
  ``DELETE /gallery/{id}``, ``GET /`` (the page in ``static/``), ``GET /healthz``, ``GET /stats``, thumbnails and
  full images by id; bearer-token checks, body-size limits, Host checks and one-line JSON errors.
- :mod:`.server` (:func:`run_server`): what the CLI command runs: token loading, socket binding, uvicorn.
- :mod:`.client` (:class:`ServeClient`): a small standard-library HTTP client for the API (tests, benchmarks).

Nothing here imports torch, torchvision or open_clip: only the deployment runtime (:mod:`tbps_compress.runtime`),
the gallery index and the web stack (FastAPI, uvicorn, python-multipart).
"""

from .client import ServeClient, ServeHTTPError

__all__ = ["ServeClient", "ServeHTTPError"]
