"""Fault-test lab: gossip nodes in network namespaces, faults, a checker, a soak command.

``netns`` builds the namespaces and packet filters, ``lab`` runs the node
processes and the client driver (``driver``, inside the lab), ``checker``
checks the cluster after each heal, ``nemesis`` injects random faults and
``soak`` (``gossip-soak``) runs the nemesis for hours.
"""
