"""pearl_runtime: the inference runtime shared by the draft and target services."""
