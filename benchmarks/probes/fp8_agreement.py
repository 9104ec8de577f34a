"""What fp8 weights cost a real draft: the demo draft's greedy token against the target's, along
the target's greedy path, with the draft's weights as stored and rounded to fp8 (layers/fp8.py).
CPU, fp32; the embedded SmolLM2 pair (`pearl models prepare` first).

    python3 benchmarks/probes/fp8_agreement.py [--prompts humaneval.jsonl] [--n 12] [--tokens 64]
"""
import argparse
import json
from pathlib import Path

from pearl_runtime.models.default_model import default_draft, default_model
from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.llm_engine import LLMEngine
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.sampling import SamplingParams

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default=str(DATA / "humaneval.jsonl"))
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    target = default_model()
    eng = LLMEngine(EngineConfig(model=target, num_blocks=512))
    rows = [json.loads(line) for line in open(args.prompts)][:args.n]
    prompts = [eng.tokenizer.encode(r["turns"][0])[:200] for r in rows]
    paths = list(zip(prompts, eng.generate(prompts, SamplingParams(max_tokens=args.tokens, ignore_eos=True))))
    for fp8 in ("off", "on"):
        draft = LLMEngine(EngineConfig(model=default_draft(target), num_blocks=512, fp8_weights=fp8), load_tok=False)
        agree = total = 0
        for prompt, gen in paths:
            seq = Sequence(prompt + gen[:-1])
            draft.blocks.allocate(seq)
            pred = draft.runner.run([seq], num_logits=[len(gen)]).argmax(-1).tolist()
            draft.blocks.free_seq(seq)
            agree += sum(a == b for a, b in zip(pred, gen))
            total += len(gen)
        print(f"fp8 weights {fp8}: the draft agrees with the target's greedy token on {agree}/{total} = "
              f"{agree / total:.3f}", flush=True)


if __name__ == "__main__":
    main()
