"""The gateway's public gRPC server: its message size limit and a request decoder whose
failure reaches the servicer (INVALID_ARGUMENT) instead of gRPC's UNKNOWN.

The internal hops keep pearl_runtime/rpc/server.py's large limits (a round's draft
probabilities); a client's request is bounded here, so an oversized one is RESOURCE_EXHAUSTED
from gRPC before any Python reads it."""
import grpc
from google.protobuf.message import DecodeError

from pearl_runtime.pb import gateway_pb2
from pearl_runtime.rpc.auth import interceptors as auth_interceptors
from pearl_runtime.rpc.server import GRPC_OPTIONS, SO_REUSEPORT, ErrorInterceptor

# a request's bytes: the largest text prompt (validation.MAX_TEXT_BYTES) and its fields fit
MAX_REQUEST_BYTES = 4 * 2**20
SERVICE = "pearl.v1.Gateway"


def public_server(auth_token: str | None = None) -> grpc.aio.Server:
    """new_server()'s options and interceptors, with the client-facing receive limit."""
    options = [(k, v) for k, v in GRPC_OPTIONS if k != "grpc.max_receive_message_length"]
    return grpc.aio.server(options=[*options, ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                    ("grpc.so_reuseport", SO_REUSEPORT)],
                           interceptors=[*auth_interceptors(auth_token), ErrorInterceptor()])


class Undecodable:
    """What a request's bytes became when they are not the message the method takes."""

    def __init__(self, message_type: str, error: DecodeError):
        self.message_type, self.error = message_type, error


def _decoder(message_cls):
    name = message_cls.DESCRIPTOR.full_name

    def decode(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return Undecodable(name, e)
    return decode


def add_gateway_servicer(servicer, server: grpc.aio.Server) -> None:
    """gateway_pb2_grpc.add_GatewayServicer_to_server with the forgiving decoder."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_decoder(gateway_pb2.GenerateRequest),
            response_serializer=gateway_pb2.GenerateResponse.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=_decoder(gateway_pb2.ListModelsRequest),
            response_serializer=gateway_pb2.ListModelsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
