"""The node's HTTP site: Prometheus metrics (``metrics.py``), the site others mount
on (``site.py``) and the live dashboard (``dashboard.py``, ``cluster_view.py``)."""
