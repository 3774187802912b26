"""The retrieval service: enrol pedestrian crops into a gallery, query it, explain each match with RAM heatmaps.

What this package owns: the FastAPI app (``app``) and its routes (``routes``), uploads into model input
(``uploads``), a query's answer from index search to heatmaps (``answering``), retention (``retention``),
settings from environment variables (``settings``), ONNX Runtime inference with the provider chosen in one
place (``inference``), dynamic micro-batching (``batching``), the FAISS index (``index``), the durable SQLite
store (``store``), the gallery that keeps index and store consistent (``gallery``), its cluster twin for
several replicas, PostgreSQL (``pg_store``) and Milvus (``milvus_index``) kept consistent by
``cluster_gallery``, heatmap rendering (``heatmaps``), the heatmap stage's gallery maps (``match_maps``) and their
cache (``map_cache``), CASN's optional pairwise re-ranking stage (``pair_ranking``) and the error shape
(``errors``).

Import rules: never imports torch or ``training``; psycopg and pymilvus (the ``[cluster]`` extra) only in the
three cluster modules, which are imported only when REID_GALLERY_BACKEND=cluster. From ``model_zoo`` it uses only the
torch-free modules:
``contract``, ``ram``, ``preprocess``, ``rerank``, ``pair_attention``, ``files`` and the default model path.
"""
