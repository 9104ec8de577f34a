"""SamplingParams <-> protobuf."""
from pearl_runtime.pb import common_pb2
from pearl_runtime.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 128


def from_proto(p: common_pb2.SamplingParams, stop_token_ids=(), default_max_tokens=DEFAULT_MAX_TOKENS
               ) -> SamplingParams:
    """Unset fields take defaults; explicit values are validated (InvalidRequest names the field)."""
    return SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else default_max_tokens,
        seed=p.seed if p.HasField("seed") else None,
        ignore_eos=p.ignore_eos,
        stop_token_ids=tuple(stop_token_ids),
    )


def to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                    max_tokens=p.max_tokens, ignore_eos=p.ignore_eos)
    if p.seed is not None:
        msg.seed = p.seed
    return msg
