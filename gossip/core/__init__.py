"""The pure protocol core: events in, effects out; no reactor, sockets, files or clock reads."""
