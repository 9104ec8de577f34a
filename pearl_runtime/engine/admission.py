"""The checks a prompt passes before it may join a batch (one place for every engine)."""
from pearl_runtime.engine.block_manager import BlockManager
from pearl_runtime.errors import InvalidRequest, OutOfBlocks


def check_prompt(prompt_ids: list[int], max_model_len: int, vocab_size: int, blocks: BlockManager,
                 field: str = "prompt", headroom: int = 1) -> None:
    """`headroom`: tokens the sequence needs in the cache beyond its prompt at once (one new
    token; a speculating target also its draft tokens)."""
    if not prompt_ids:
        raise InvalidRequest(field, "is empty")
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequest(field, f"has {len(prompt_ids)} tokens; the context window is "
                                    f"{max_model_len} and must leave room for one new token")
    bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if blocks.blocks_needed(len(prompt_ids) + headroom) > len(blocks.blocks):
        raise OutOfBlocks(f"prompt of {len(prompt_ids)} tokens needs more KV blocks than the cache has "
                          f"({len(blocks.blocks)} blocks of {blocks.block_size})")
