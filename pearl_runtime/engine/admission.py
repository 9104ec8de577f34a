"""The checks a prompt passes before it may join a batch (one place for every engine)."""
from pearl_runtime.engine.block_manager import BlockManager
from pearl_runtime.errors import OutOfBlocks
from pearl_runtime.validation import check_prompt_ids


def check_prompt(prompt_ids: list[int], max_model_len: int, vocab_size: int, blocks: BlockManager,
                 field: str = "prompt", headroom: int = 1) -> None:
    """`headroom`: tokens the sequence needs in the cache beyond its prompt at once (one new
    token; a speculating target also its draft tokens)."""
    check_prompt_ids(prompt_ids, max_model_len, vocab_size, field)
    if blocks.blocks_needed(len(prompt_ids) + headroom) > len(blocks.blocks):
        raise OutOfBlocks(f"prompt of {len(prompt_ids)} tokens needs more KV blocks than the cache has "
                          f"({len(blocks.blocks)} blocks of {blocks.block_size})")
