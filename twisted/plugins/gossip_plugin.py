from twisted.application.service import ServiceMaker

gossip = ServiceMaker("gossip", "gossip.tap", "Run one node of a gossip cluster.", "gossip")
