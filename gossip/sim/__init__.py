"""Deterministic discrete-event simulation of many ``GossipCore`` nodes.

No reactor, no sockets, no clock: a seeded event queue of frame deliveries over
a fake network, for measuring dissemination strategies and for tests.
"""

from gossip.sim.network import Delivery, Simulation, Stats

__all__ = ["Delivery", "Simulation", "Stats"]
