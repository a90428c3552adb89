"""gossip: a gossip broadcast cluster on Twisted.

The protocol rules live in ``gossip.core`` (pure, no I/O); ``gossip.node`` wires
them to TCP links (``gossip.net``), storage (``gossip.store``) and the client
AMP protocol (``gossip.client``).
"""

__version__ = "0.1.0"
