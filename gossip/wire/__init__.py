"""The peer wire format: generated protobuf modules (``peer_pb2``) and the codec."""
