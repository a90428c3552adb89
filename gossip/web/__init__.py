"""The node's HTTP site: Prometheus metrics (``metrics.py``), pages others mount (``site.py``)."""
