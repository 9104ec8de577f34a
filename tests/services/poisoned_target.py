"""`python -m tests.services.poisoned_target ARGS`: the target service (same flags), except that
judging the request whose seed is POISON_SEED raises on its POISON_AT-th round, as a numeric
failure in one sequence's sampling would. What tests/services/test_isolation.py runs."""
from target_service import __main__ as target_main
from target_service import verifier

POISON_SEED = 4242
POISON_AT = 3
_real_judge = verifier.judge
_calls = {"n": 0}


def _judge(*args, **kwargs):
    params = args[5]
    if params.seed == POISON_SEED:
        _calls["n"] += 1
        if _calls["n"] == POISON_AT:
            raise FloatingPointError("poisoned: probabilities are NaN")
    return _real_judge(*args, **kwargs)


verifier.judge = _judge

if __name__ == "__main__":
    target_main.main()
