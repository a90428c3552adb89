"""The node's web server: Prometheus metrics and the live dashboard."""
