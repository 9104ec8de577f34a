"""The model runner owns the device: the model, its paged KV cache and the forward pass."""
import dataclasses
import gc
from collections import Counter
from dataclasses import dataclass

import torch

from pearl_runtime.attention import select_backend
from pearl_runtime.config import EngineConfig, ModelConfig
from pearl_runtime.engine.cuda_graph import GraphRunner
from pearl_runtime.engine.gemm_check import check_gemms, needs_check
from pearl_runtime.engine.sequence import Sequence
from pearl_runtime.engine.step import StepInput
from pearl_runtime.layers import fp8, skinny
from pearl_runtime.layers.fused import enable_compile
from pearl_runtime.models.decoder import CausalLM
from pearl_runtime.models.synthetic import calibrate, init_synthetic, synthetic_spec
from pearl_runtime.utils.context import AttnContext, set_context
from pearl_runtime.utils.dist import min_over_ranks
from pearl_runtime.utils.loader import load_weights
from pearl_runtime.log import get_logger

log = get_logger(__name__)


@dataclass
class StagedStep:
    """A forward prepared by `ModelRunner.stage`, waiting for `launch`."""
    seqs: list[Sequence]
    step: StepInput
    key: tuple[int, int] | None   # its graph, None: it runs eagerly
    inputs: tuple | None          # a graph step's packed inputs (GraphRunner.stage)


class ModelRunner:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":   # Triton launches on the current device, not the tensors'
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        model_cfg = ModelConfig.from_dir(cfg.model, cfg.torch_dtype)
        self.max_model_len = min(cfg.max_model_len or model_cfg.max_position_embeddings,
                                 model_cfg.max_position_embeddings)
        self.model_cfg = dataclasses.replace(model_cfg, max_position_embeddings=self.max_model_len)
        if self.device.type == "cuda" and needs_check():
            c = model_cfg
            check_gemms(self.device, cfg.torch_dtype,
                        [(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
                         (c.num_heads * c.head_dim, c.hidden_size),
                         (c.hidden_size, 2 * c.intermediate_size), (c.intermediate_size, c.hidden_size)])
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(cfg.torch_dtype)
        try:
            with self.device:
                self.model = CausalLM(self.model_cfg)
        finally:
            torch.set_default_dtype(default_dtype)
        self.synthetic = synthetic_spec(cfg.model)
        if self.synthetic:
            init_synthetic(self.model, self.synthetic)
        else:
            load_weights(self.model, cfg.model)
        self.model.eval()
        self.backend = select_backend(cfg.attention_backend, self.device, cfg.block_size)
        self.block_size = cfg.block_size
        # every TP rank must hold the same blocks: the group takes the smallest
        self.num_blocks = min_over_ranks(cfg.num_blocks or self._blocks_for(cfg.kv_cache_gb))
        self._allocate_kv_cache()
        self.graphs = None
        self._eager_shapes: Counter[tuple[int, int]] = Counter()   # eager steps by (batch, query) class
        self.model.model.skinny_ops = self._skinny_ops(cfg.skinny_linears)
        if self._fp8_weights(cfg.fp8_weights):
            fp8.apply(self.model)
        if self.synthetic and self.synthetic.get("accept") is not None:
            self.synthetic["measured_accept"] = calibrate(self, self.synthetic)
        if self.device.type == "cuda" and cfg.compile_ops:
            enable_compile()
        if self.device.type == "cuda" and cfg.cuda_graphs:
            self.graphs = GraphRunner(self.model, self.device, self.block_size, self.scratch_slot,
                                      max_blocks_per_seq=-(-self.max_model_len // self.block_size),
                                      max_batch=cfg.max_num_seqs, q_buckets=cfg.graph_query_lens)
            self.graphs.capture()
        log.info("forward path: %s", "cuda graphs for steps within buckets, eager otherwise"
                 if self.graphs else "eager")

    def _skinny_ops(self, choice: str):
        if choice == "auto":
            small = self.model_cfg.hidden_size <= skinny.AUTO_MAX_HIDDEN
            choice = "triton" if self.device.type == "cuda" and skinny.TRITON is not None and small else "off"
        if choice == "off":
            log.info("linears: cuBLAS for every step (skinny_linears=%s, hidden size %d)",
                     self.cfg.skinny_linears, self.model_cfg.hidden_size)
            return None
        ops = skinny.REFERENCE if choice == "reference" else skinny.TRITON
        if ops is None:
            raise RuntimeError("skinny_linears=triton but triton is not installed")
        if choice == "triton" and self.device.type != "cuda":
            raise RuntimeError("skinny_linears=triton needs a CUDA device")
        c = self.model_cfg
        rope = ops.norm_qkv_rope is not None and skinny.fits_qkv_rope(c.head_dim, c.qk_norm)
        rows = self.model.model.skinny_rows = skinny.rows_for(c.hidden_size)
        log.info("linears: steps of up to %d token(s) fold norm/SiLU/residual%s into %s kernels, larger steps "
                 "cuBLAS", rows, " and rotary + K/V store" if rope else "", ops.name)
        return ops

    def _fp8_weights(self, choice: str) -> bool:
        ops = self.model.model.skinny_ops
        if choice == "auto":
            cc = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
            on = ops is not None and ops is skinny.TRITON and cc is not None and cc >= (8, 9) and self.cfg.tp_size == 1
            log.info("weights: fp8_weights=auto -> %s (%s)", "on" if on else "off",
                     f"device {self.device}, compute capability {cc}, skinny linears {ops.name if ops else 'off'}, "
                     f"tp {self.cfg.tp_size}")
            return on
        if choice == "on" and ops is None:
            log.warning("weights: fp8_weights=on without the skinny kernels: the weights are rounded to fp8 but "
                        "every step still reads them in %s", self.cfg.dtype)
        return choice == "on"

    def _block_bytes(self) -> int:
        c = self.model_cfg
        kv_heads = self.model.attention_layers()[0].num_kv_heads   # this rank's (padded) share
        return 2 * c.num_layers * self.block_size * kv_heads * c.head_dim * self.cfg.torch_dtype.itemsize

    def _blocks_for(self, gb: float) -> int:
        return max(1, int(gb * 2**30) // self._block_bytes())

    def _allocate_kv_cache(self) -> None:
        c = self.model_cfg
        kv_heads = self.model.attention_layers()[0].num_kv_heads   # this rank's (padded) share
        # one extra block, never handed out: padding tokens of CUDA-graph steps write there
        self.kv_cache = torch.zeros(2, c.num_layers, self.num_blocks + 1, self.block_size, kv_heads, c.head_dim,
                                    dtype=self.cfg.torch_dtype, device=self.device)
        self.scratch_slot = self.num_blocks * self.block_size
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache, attn.backend = self.kv_cache[0, i], self.kv_cache[1, i], self.backend
        log.info("kv cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                 self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)

    def prepare(self, seqs: list[Sequence], num_logits: list[int] | None = None) -> StepInput:
        """Host-side metadata for one forward: every token of each sequence not yet in the cache."""
        num_logits = num_logits or [1] * len(seqs)
        ids, positions, slots, q_lens, ctx_lens = [], [], [], [], []
        bs = self.block_size
        for seq in seqs:
            start, end = seq.num_kv, len(seq)
            assert end > start, f"sequence {seq.seq_id} has nothing to compute"
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            q_lens.append(end - start)
            ctx_lens.append(end)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in seqs]
        cu, rows = [0], []
        for n, k in zip(q_lens, num_logits):
            assert k <= n, f"asked for {k} logits rows from {n} fed tokens"
            cu.append(cu[-1] + n)
            rows.extend(range(cu[-1] - k, cu[-1]))
        return StepInput(ids=ids, positions=positions, slots=slots, q_lens=q_lens, ctx_lens=ctx_lens,
                         cu_seqlens_q=cu, block_tables=tables, logit_rows=rows)

    def context(self, step: StepInput) -> AttnContext:
        dev = self.device
        return AttnContext(
            q_lens=step.q_lens, context_lens=step.ctx_lens,
            cu_seqlens_q=torch.tensor(step.cu_seqlens_q, dtype=torch.int32, device=dev),
            q_lens_t=torch.tensor(step.q_lens, dtype=torch.int32, device=dev),
            context_lens_t=torch.tensor(step.ctx_lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(step.slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(step.block_tables, dtype=torch.int32, device=dev),
            max_q_len=max(step.q_lens), max_context_len=max(step.ctx_lens))

    @torch.inference_mode()
    def execute(self, step: StepInput, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor work of one forward (every TP rank runs this with the same StepInput).
        `ids`, a device tensor, replaces step.ids: a chained step feeds the last step's output
        without a round trip through the host."""
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            # the current device is per thread, and services run forwards on worker threads:
            # Triton kernels, events and streams follow it, not the tensors
            torch.cuda.set_device(self.device)
        if self.graphs is not None:
            if (key := self.graphs.bucket(step)) is not None:
                return self.model.logits(self.graphs.run(step, key, ids)).float()
            self._note_eager(step)
        ctx = self.context(step)
        if ids is None:
            ids = torch.tensor(step.ids, dtype=torch.int64, device=self.device)
        positions = torch.tensor(step.positions, dtype=torch.int64, device=self.device)
        set_context(ctx)
        try:
            hidden = self.model(ids, positions)
        finally:
            set_context(None)
        return self.model.logits(hidden[torch.tensor(step.logit_rows, device=self.device)]).float()

    def _note_eager(self, step: StepInput) -> None:
        """Say once per (batch, longest query) power-of-2 class when a step misses the graphs,
        and again at its 10th, 100th, ... step: prefills miss by design, a class that keeps
        missing (a verify, a draft's catch-up) is a bucket to add (its first shapes also wait
        for Triton to compile)."""
        shape = (1 << (len(step.q_lens) - 1).bit_length(), 1 << (max(step.q_lens) - 1).bit_length())
        n = self._eager_shapes[shape] = self._eager_shapes[shape] + 1
        if n == 1:
            log.info("eager step outside the graph buckets: batch %d, longest query %d",
                     len(step.q_lens), max(step.q_lens))
        elif n in (10, 100, 1000, 10000):
            # a class that keeps coming is per-round work, not a prefill: worth a bucket
            log.info("eager steps of batch <= %d, longest query <= %d: %d so far", *shape, n)

    def close(self) -> None:
        """Nothing to release for one process (a TP group stops its workers here)."""

    def release_graphs(self) -> None:
        """Drop the captured graphs (and their memory) before a TP rank leaves its NCCL group:
        graphs that captured the group's collectives keep its communicators busy (pytorch#115388)."""
        if self.graphs is not None:
            self.graphs = None
            gc.collect()
            torch.cuda.synchronize(self.device)

    # a TP group broadcasts each StepInput from the host, so it cannot feed device tensors
    chains_on_device = True

    @torch.inference_mode()
    def greedy_chain(self, seqs: list[Sequence], steps: int, defer: bool = False):
        """`steps` greedy decode steps with a single device sync, at the end: step k > 0 takes
        step k-1's argmax straight from the device, so the host prepares step k while the
        device still runs step k-1 (on a GPU the draft's small steps are otherwise bound by
        host work and syncs). The caller has made cache room for `steps` - 1 more tokens.
        Appends the tokens to each sequence; the last one is not fed, as after `run`.
        `defer`: no sync; returns the tokens as a device tensor [n, steps] and leaves the
        sequences as they were until `commit_chain` gets the tokens."""
        first = self.prepare(seqs)
        tokens = [self.execute(first).argmax(-1)]
        base = [len(s) for s in seqs]
        bs, n = self.block_size, len(seqs)
        for k in range(1, steps):
            pos = [b + k - 1 for b in base]     # the token step k-1 produced
            step = StepInput(ids=[0] * n, positions=pos,
                             slots=[s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)],
                             q_lens=[1] * n, ctx_lens=[p + 1 for p in pos], cu_seqlens_q=list(range(n + 1)),
                             block_tables=first.block_tables, logit_rows=list(range(n)))
            tokens.append(self.execute(step, tokens[-1]).argmax(-1))
        if defer:
            return torch.stack(tokens, 1)
        out = torch.stack(tokens, 1).tolist()
        self.commit_chain(seqs, out)
        return out

    @staticmethod
    def commit_chain(seqs: list[Sequence], out: list[list[int]]) -> None:
        """What greedy_chain does to the sequences once their tokens are on the host."""
        for seq, new in zip(seqs, out):
            seq.token_ids.extend(new)
            seq.num_kv = len(seq) - 1

    def stage(self, seqs: list[Sequence], num_logits: list[int] | None = None) -> StagedStep:
        """`run` in two halves: the host work now (for a graph step, its inputs packed in pinned
        memory; nothing is queued on the device), the launch later (`launch`), once the device
        ids it will take exist. The sd target stages its verify before it waits for the
        draft's tokens."""
        assert self.chains_on_device, "a TP group's steps go through execute"
        step = self.prepare(seqs, num_logits)
        key = self.graphs.bucket(step) if self.graphs is not None else None
        return StagedStep(seqs, step, key, self.graphs.stage(step, key) if key is not None else None)

    @torch.inference_mode()
    def launch(self, staged: StagedStep, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The second half of `run` for a `stage`d step (the last one staged for its graph)."""
        if staged.key is None:
            logits = self.execute(staged.step, ids)
        else:
            if torch.cuda.current_device() != self.device.index:   # as in execute
                torch.cuda.set_device(self.device)
            logits = self.model.logits(self.graphs.replay(staged.key, staged.inputs, ids)).float()
        for seq in staged.seqs:
            seq.num_kv = len(seq)
        return logits

    def run(self, seqs: list[Sequence], num_logits: list[int] | None = None,
            ids: torch.Tensor | None = None) -> torch.Tensor:
        """Feed every token of each sequence that is not in the KV cache yet. Returns fp32
        logits for the last `num_logits[i]` fed positions of each sequence (default 1),
        concatenated in order: [sum(num_logits), vocab]. `ids` (on the device, int64, in the
        fed order) replaces the sequences' own tokens: draft tokens that never left the GPU."""
        logits = self.execute(self.prepare(seqs, num_logits), ids)
        for seq in seqs:
            seq.num_kv = len(seq)
        return logits
