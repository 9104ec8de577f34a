"""`pearl generate` against a real stack: its sampling and output flags reach the gateway."""
import json
import subprocess
import sys

import pytest

from tests.services.procs import reference_greedy

PROMPT = "Once upon a time there was a little robot named Pixel."


@pytest.fixture(scope="module")
def stack(cluster):
    return cluster.stack("copy", "pearl")


def pearl_generate(address, *flags) -> dict:
    done = subprocess.run([sys.executable, "-m", "pearl_runtime.cli", "generate", "--address", address, "--raw",
                           "--json", *flags, PROMPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout    # --json: one object, no streamed text
    return json.loads(lines[0])


def test_json_output_is_greedy_and_equals_the_target_alone(stack):
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(stack.target_model)).encode(PROMPT)
    out = pearl_generate(stack.gateway.address, "--max-tokens", "24", "--temperature", "0")
    n = len(out["token_ids"])
    assert 0 < n <= 24 and out["stats"]["new_tokens"] == n
    assert out["token_ids"] == reference_greedy(stack.target_model, [ids], [24])[0][:n]
    assert out["finish_reason"] in ("length", "stop") and out["stats"]["mode"] == "pearl"


def test_top_k_one_samples_the_greedy_tokens_and_seed_repeats(stack):
    greedy = pearl_generate(stack.gateway.address, "--max-tokens", "16")
    top1 = pearl_generate(stack.gateway.address, "--max-tokens", "16", "--temperature", "1.0", "--top-k", "1",
                          "--seed", "5")
    assert top1["token_ids"] == greedy["token_ids"]
    hot = ["--max-tokens", "16", "--temperature", "1.5", "--top-p", "0.95", "--seed", "11"]
    assert pearl_generate(stack.gateway.address, *hot)["token_ids"] == \
        pearl_generate(stack.gateway.address, *hot)["token_ids"]


def test_stop_ends_the_text_before_the_stop_string(stack):
    full = pearl_generate(stack.gateway.address, "--max-tokens", "24")["text"]
    cut = full[len(full) // 3: len(full) // 3 + 3]
    assert cut.strip(), full
    out = pearl_generate(stack.gateway.address, "--max-tokens", "24", "--stop", "zzz-never", "--stop", cut)
    assert out["finish_reason"] == "stop_string"
    assert out["text"] == full[:full.index(cut)]
