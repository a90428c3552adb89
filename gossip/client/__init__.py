"""The client side: AMP commands (shared with the node), Python API, the ``gclient`` CLI."""
