"""The gallery backends a test module's server fixture runs on, and reading what a server stored; the
cluster's servers themselves are ``harness.cluster``'s."""

BACKENDS = ["embedded", "cluster"]  # a module's server fixture parametrized by these runs its tests on both


def backend_settings(request) -> dict:
    """ServiceProcess settings for the gallery backend ``request.param`` names: none for the embedded default,
    a fresh database and collection for the cluster (which starts PostgreSQL and milvus-lite once, or skips)."""
    return request.getfixturevalue("cluster_servers").new_gallery() if request.param == "cluster" else {}


def stored_embeddings(server, ids):
    """[len(ids), D]: the embeddings a server's gallery stores for ``ids``, read from its SQLite file or its
    PostgreSQL database."""
    import numpy as np

    rows = stored_column(server, "embedding", ids)
    return np.stack([np.frombuffer(rows[i], np.float32) for i in ids])


def stored_maps(server, ids) -> int:
    """How many of ``ids`` have stored maps (service.stored_maps) in a server's gallery."""
    return sum(blob is not None for blob in stored_column(server, "maps", ids).values())


def stored_column(server, column: str, ids) -> dict:
    """{id: value of ``column``} for ``ids`` in a server's gallery: its SQLite file or its PostgreSQL database."""
    if server.env.get("REID_GALLERY_BACKEND") == "cluster":
        import psycopg

        with psycopg.connect(server.env["REID_POSTGRES_DSN"]) as db:
            return dict(db.execute(f"SELECT id, {column} FROM items WHERE id = ANY(%s)", (list(ids),)).fetchall())
    import sqlite3

    db = sqlite3.connect(server.env["REID_STORE_PATH"])
    try:
        return dict(
            db.execute(f"SELECT id, {column} FROM items WHERE id IN ({','.join('?' * len(ids))})", list(ids)).fetchall()
        )
    finally:
        db.close()
