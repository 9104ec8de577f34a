"""What two services compare before they cooperate: the Speculate protocol and the tokenizer."""
import hashlib
import json

# The Draft.Speculate protocol (draft.proto's Round, DraftBatch and verdict columns). Target and
# draft roll out independently: a handshake between two versions is refused, naming both,
# and the target serves ar meanwhile. Bump it with any change either side must understand.
PROTOCOL_VERSION = 1


def protocol_mismatch(target: int, draft: int) -> str | None:
    """Why a target and a draft of these protocol versions cannot speculate together (None: they can)."""
    if target == draft:
        return None
    return f"Speculate protocol mismatch: target speaks v{target}, draft speaks v{draft}"


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
