"""TCP links between neighbours: framing, handshake, reconnection, the link table."""
