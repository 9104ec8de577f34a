"""Model configuration read from a Hugging Face `config.json`, validated once."""
import json
import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pearl_runtime import envs
from pearl_runtime.flags import add_operating_args, export_flags
from pearl_runtime.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False       # Qwen2
    qk_norm: bool = False        # Qwen3
    rope_scaling: dict | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_attention_heads={self.num_heads} is not a multiple of "
                                 f"num_key_value_heads={self.num_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_dir(cls, model_dir: str | Path, dtype: torch.dtype | None = None) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"no config.json in model directory {model_dir}")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        archs = hf.get("architectures") or []
        if not archs:
            raise ModelLoadError(f"{path} names no architecture; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        arch = archs[0]
        # transformers >= 5 writes `rope_parameters` (holding rope_theta); older configs use
        # `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") == "default":
            rope = {}
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if dtype is None:
            dtype = torch.float32
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=rope or None,
            eos_token_ids=eos,
            dtype=dtype,
        )


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EngineConfig:
    """What one engine (draft or target) needs to run a model."""
    model: str
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int = 0              # 0: size the cache from kv_cache_gb
    kv_cache_gb: float = 0.5
    max_num_seqs: int = 64
    max_prefill_tokens: int = 0      # a target step's prompt tokens (engine/scheduler.py); 0: no limit
    max_model_len: int = 0           # 0: the model's max_position_embeddings
    enable_prefix_cache: bool = True
    attention_backend: str = "auto"  # auto | reference | triton | flash-attn
    compile_ops: bool = True         # GPU only: torch.compile the elementwise ops (layers/fused.py)
    cuda_graphs: bool = True         # GPU only: graphs for small uniform steps, eager otherwise
    # steps of <= 16 tokens: norm, SiLU and residual add folded into the linears (layers/skinny.py);
    # auto: the Triton kernel on CUDA for models of hidden size <= 2048, else off | triton |
    # reference (the torch ops) | off
    skinny_linears: str = "auto"
    # a draft's linears and LM head rounded to fp8 (layers/fp8.py): off | on | auto (on where the
    # skinny Triton kernels run on a GPU with fp8 conversions, compute capability >= 8.9)
    fp8_weights: str = "off"
    # query buckets (draft decode: 1; verify: up to gamma + 1, so 32 holds the default max gamma of 16:
    # a verify past the buckets runs eagerly and its first new shape waits for Triton to compile)
    graph_query_lens: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    tp_size: int = 1                 # tensor-parallel ranks, one process each (gloo on CPU, NCCL on GPU)
    devices: list[int] | None = None   # GPU of each rank; None: consecutive from `device` ("cuda:0,1" works too)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.skinny_linears not in ("auto", "triton", "reference", "off"):
            raise ValueError(f"skinny_linears must be auto, triton, reference or off, got {self.skinny_linears!r}")
        if self.fp8_weights not in ("auto", "on", "off"):
            raise ValueError(f"fp8_weights must be auto, on or off, got {self.fp8_weights!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if "," in self.device:   # "cuda:0,1": one GPU per rank
            kind, _, ids = self.device.partition(":")
            self.devices = self.devices or [int(i) for i in ids.split(",")]
            self.device = f"{kind}:{self.devices[0]}"
        if self.devices is not None and self.tp_size == 1:
            self.tp_size = len(self.devices)
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.devices is not None and len(self.devices) != self.tp_size:
            raise ValueError(f"tp_size={self.tp_size} needs {self.tp_size} devices, got {self.devices}")

    def rank_device(self, rank: int) -> str:
        """The device of TP rank `rank`."""
        kind, _, index = self.device.partition(":")
        if kind != "cuda":
            return self.device
        if self.devices is not None:
            return f"cuda:{self.devices[rank]}"
        return f"cuda:{int(index or 0) + rank}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags both services take (each has its PEARL_* variable, envs.py)."""
    from pearl_runtime.keep_awake import CHOICES as KEEP_AWAKE
    p.add_argument("--model", default=envs.default("PEARL_MODEL"), help="HF model directory (default: the embedded SmolLM2)")
    p.add_argument("--host", default=envs.default("PEARL_HOST"))
    p.add_argument("--device", default=envs.default("PEARL_DEVICE"),
                   help="cpu, cuda, cuda:N, or cuda:0,1,... (one GPU per tensor-parallel rank)")
    p.add_argument("--tp", type=int, default=envs.default("PEARL_TP"),
                   help="tensor-parallel ranks (processes); on GPU they take consecutive GPUs from --device")
    p.add_argument("--dtype", default=envs.default("PEARL_DTYPE"), help="float32 | bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--block-size", type=int, default=envs.default("PEARL_BLOCK_SIZE"), help="tokens per KV cache block")
    p.add_argument("--kv-cache-gb", type=float, default=envs.default("PEARL_KV_CACHE_GB"), help="KV cache per rank, GiB")
    p.add_argument("--max-num-seqs", type=int, default=envs.default("PEARL_MAX_NUM_SEQS"),
                   help="sequences one engine step may hold")
    p.add_argument("--max-model-len", type=int, default=envs.default("PEARL_MAX_MODEL_LEN"),
                   help="longest sequence, prompt included (0: the model's max_position_embeddings)")
    p.add_argument("--attention", default=envs.default("PEARL_ATTENTION"),
                   choices=("auto", "reference", "triton", "flash-attn"), help="the attention kernels")
    p.add_argument("--skinny-linears", default=envs.default("PEARL_SKINNY_LINEARS"),
                   help="steps of <= 16 tokens with norm/SiLU/residual folded into the linears: "
                        "auto (Triton on GPU for hidden size <= 2048) | triton | reference | off")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   default=envs.default("PEARL_PREFIX_CACHE"),
                   help="recompute every prompt (default: reuse cached KV blocks of shared prefixes)")
    p.add_argument("--threads", type=int, default=envs.default("PEARL_THREADS"), help="CPU threads for torch")
    p.add_argument("--keep-awake", default=envs.default("PEARL_KEEP_AWAKE"), choices=KEEP_AWAKE,
                   help="a lowest-priority busy loop on each core, so a woken thread never waits for a halted "
                        "core (~0.2 ms a gRPC hop on virtual machines; the cores read 100%% busy); auto: on with "
                        "a GPU, off on CPU and under a cgroup CPU quota (the loops would spend it)")
    add_operating_args(p)
    d = p.add_argument_group("diagnostics")
    d.add_argument("--tp-timeout", type=float, default=envs.default("PEARL_TP_TIMEOUT_S"),
                   help="seconds a tensor-parallel collective may wait (default: torch's)")
    d.add_argument("--skinny-rows", type=int, choices=(1, 2), default=envs.default("PEARL_SKINNY_ROWS"),
                   help="force the row count the skinny kernels take")
    d.add_argument("--no-pdl", dest="pdl", action="store_false", default=envs.default("PEARL_PDL"),
                   help="no programmatic dependent launch (Hopper)")


ENGINE_EXPORTS = {"PEARL_TP_TIMEOUT_S": "tp_timeout", "PEARL_SKINNY_ROWS": "skinny_rows", "PEARL_PDL": "pdl",
                  "PEARL_GC_FREEZE": "gc_freeze"}


def engine_config_from_args(args, model: str) -> "EngineConfig":
    """The EngineConfig of a service's parsed engine flags (the diagnostic ones are exported)."""
    export_flags(args, ENGINE_EXPORTS)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return EngineConfig(model=model, dtype=dtype, device=args.device, block_size=args.block_size,
                        kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, attention_backend=args.attention,
                        skinny_linears=args.skinny_linears, tp_size=args.tp, enable_prefix_cache=args.prefix_cache, extra={"threads": args.threads})
