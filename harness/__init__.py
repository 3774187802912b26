"""Real servers on loopback for the tests and the benchmarks: the service as users run it (``python -m
service``) and the cluster backend's PostgreSQL and Milvus. May import every package of the project; only
``tests/`` and ``bench/`` import it."""
