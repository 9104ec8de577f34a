"""In-process autoregressive generation with continuous batching (the `ar` baseline and
the runtime both services build on)."""
from dataclasses import dataclass

from transformers import AutoTokenizer

from pearl_runtime.config import EngineConfig
from pearl_runtime.engine.admission import check_prompt
from pearl_runtime.engine.block_manager import BlockManager
from pearl_runtime.engine.scheduler import Scheduler
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.engine.stopping import commit
from pearl_runtime.engine.tp_group import make_runner
from pearl_runtime.errors import ModelLoadError
from pearl_runtime.sampling import SamplingParams, sample_batch
from pearl_runtime.log import get_logger

log = get_logger(__name__)


def load_tokenizer(model_dir: str):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"no usable tokenizer in {model_dir} (need tokenizer.json or "
                             f"tokenizer_config.json + vocab files): {e}") from e


@dataclass
class StepOutput:
    seq: Sequence
    new_tokens: list[int]
    finished: bool


class LLMEngine:
    def __init__(self, cfg: EngineConfig, load_tok: bool = True):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model) if load_tok else None
        self.runner = make_runner(cfg)   # TP group when cfg.tp_size > 1
        # one sequence must fit in the whole cache, or preempting the others never makes room
        # for it and generation stalls: the cache size caps the context window
        capacity = self.runner.num_blocks * cfg.block_size
        if capacity < self.runner.max_model_len:
            log.warning("KV cache holds %d tokens, fewer than the context window of %d: capping it",
                        capacity, self.runner.max_model_len)
        self.max_model_len = min(self.runner.max_model_len, capacity)
        self.eos_ids = self.runner.model_cfg.eos_token_ids
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_cache)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        check_prompt(prompt_ids, self.max_model_len, self.runner.model_cfg.vocab_size, self.blocks)

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Sequence:
        self.check_prompt(prompt_ids)
        seq = Sequence(prompt_ids, params or SamplingParams())
        self.scheduler.add(seq)
        return seq

    def step(self) -> list[StepOutput]:
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        logits = self.runner.run(seqs)
        tokens = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])
        out = []
        for seq, tok in zip(seqs, tokens):
            new = commit(seq, [tok], self.eos_ids, self.max_model_len)
            done = seq.finish_reason is not None
            if done:
                self.scheduler.finish(seq)
            out.append(StepOutput(seq, new, done))
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Token ids in, completion token ids out (in prompt order)."""
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        seqs = [self.add(p, sp) for p, sp in zip(prompts, params)]
        while self.scheduler.has_work():
            self.step()
        return [s.completion_ids for s in seqs]
