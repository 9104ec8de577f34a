"""Benchmark prompts: Spec-Bench style jsonl (`{"turns": [str, ...]}`) tokenized once with the
target's tokenizer, so every mode and batch size sees the same token ids."""
import itertools
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
DEFAULT_PROMPTS = DATA_DIR / "humaneval.jsonl"


def load_turns(path: str | Path) -> list[str]:
    """The first turn of every line."""
    texts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        turns = json.loads(line).get("turns") or []
        if not turns:
            raise ValueError(f"{path}:{n}: no 'turns'")
        texts.append(turns[0])
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts


def tokenize(texts: list[str], model_dir: str | Path, vocab_size: int, prompt_len: int | None = None) -> list[list[int]]:
    """Token ids per text: the chat template (one user turn) where the tokenizer has one,
    plain encoding otherwise; ids wrapped modulo `vocab_size` (synthetic models' tokenizers
    may be smaller than their vocabulary or the other way round); cut to `prompt_len`."""
    from pearl_runtime.engine.llm_engine import load_tokenizer
    tok = load_tokenizer(str(model_dir))
    out = []
    for text in texts:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok.encode(text, add_special_tokens=False)
        ids = [int(i) % vocab_size for i in ids]
        out.append(ids[:prompt_len] if prompt_len else ids)
    return out


def take(prompts: list[list[int]], n: int, start: int = 0) -> list[list[int]]:
    """n prompts from index `start` on, cycling when there are fewer."""
    return list(itertools.islice(itertools.cycle(prompts), start, start + n))


def batches(prompts: list[list[int]], bs: int, min_seqs: int) -> list[list[list[int]]]:
    """Batches of bs prompts, the first batch from the first prompt on, enough of them to cover
    at least min_seqs sequences."""
    return [take(prompts, bs, k * bs) for k in range(max(1, -(-min_seqs // bs)))]
