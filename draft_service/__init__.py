"""The drafter: mirrors the target's sequences and proposes gamma tokens a round."""
