"""Conversions shared by the services at the gRPC boundary (protobuf stops here)."""
