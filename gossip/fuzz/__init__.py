"""Fuzzing what strangers can send a node: peer frames, handshakes, AMP requests, log files.

Each target (``gossip.fuzz.targets``) takes one input as bytes and raises
``FuzzFailure`` when the node mishandles it: an exception that is not the
clean rejection, a log event at critical level or with a traceback, a buffer
past its bound, a stored message that is not what it claims, a hang. The CI
test (``tests/test_fuzz.py``) feeds them hypothesis strategies that build valid
frames, boxes and logs and then damage them (``gossip.fuzz.inputs``);
``gossip-fuzz`` (``gossip.fuzz.cli``) runs them for a long budget with atheris
when it is installed, else with a random-mutation loop.
"""
