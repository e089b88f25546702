"""tbps_compress.retrieval: metrics (R@K, mAP, mINP), the gallery index and text search.

Nothing is imported here: ``retrieval.metrics`` needs torch, while ``retrieval.index`` and ``retrieval.search`` must
stay importable without it (ONNX artifacts run on the torch-free runtime). Import the submodules directly.
"""
