"""When a sequence is done: stop tokens, EOS, max_tokens, the context window."""
from pearl_runtime.engine.sequence import Sequence


def finish_reason(seq: Sequence, eos_ids: tuple[int, ...], max_model_len: int) -> str | None:
    last = seq.last_token
    if last in seq.params.stop_token_ids or (not seq.params.ignore_eos and last in eos_ids):
        return "stop"
    if seq.num_completion_tokens >= seq.params.max_tokens or len(seq) >= max_model_len:
        return "length"
    return None


def commit(seq: Sequence, tokens: list[int], eos_ids: tuple[int, ...], max_model_len: int) -> list[int]:
    """Append tokens one by one until the sequence finishes; returns those appended.
    Speculation may propose tokens past the end; they are never committed."""
    done = []
    for t in tokens:
        seq.token_ids.append(t)
        done.append(t)
        reason = finish_reason(seq, eos_ids, max_model_len)
        if reason:
            seq.finish_reason = reason
            break
    return done
