"""The verifier and owner of truth: schedules sequences, verifies drafts, commits tokens."""
