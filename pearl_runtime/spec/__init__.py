"""The speculative-decoding policy, pure: verdict (judge), round_model (closed forms), policy
(gamma tuner, flag parsers), verify_cost (the verify-time table it prices with)."""
