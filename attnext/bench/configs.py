"""What is benchmarked: suites of shapes, the --shapes syntax, and FLOP counts."""

import dataclasses

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MODES = ("fwd", "bwd", "fwdbwd")  # bwd: the backward alone, its forward run outside the timing
BACKWARD_FACTOR = 2.5  # backward FLOPs = 2.5 x forward (FlashAttention's convention)

# Each suite: (B, H, S, D) shapes, default dtypes, one line of description.
SUITES = {
    "quick": (
        [(1, 16, 512, 64), (1, 16, 512, 128), (1, 8, 1024, 64), (1, 8, 1024, 128)],
        ("float32", "bfloat16"),
        "a short run: B=1, H*S=8192, S in {512, 1024}, D in {64, 128}",
    ),
    "anchors": (
        [(1, 8192 // s, s, d) for d in (64, 128) for s in (512, 1024, 2048, 4096)],
        ("float32", "bfloat16"),
        "the CPU table of anchors.md: B=1, H=8192/S, S in 512..4096, D in {64, 128}",
    ),
    "cpu": (
        [(1, 8192 // s, s, d) for d in (32, 64, 128, 256) for s in (512, 1024, 2048, 4096)],
        ("float32", "bfloat16", "float16"),
        "the CPU acceptance targets (below): the anchors shapes with D in {32, 64, 128, 256}; decode",
    ),
    "gpu": (
        [(16384 // s, 2048 // d, s, d) for d in (64, 128, 256) for s in (512, 1024, 2048, 4096, 8192, 16384)],
        ("bfloat16",),
        "FlashAttention's benchmark shapes: B*S=16384, H*D=2048, S in 512..16384, D in {64, 128, 256}",
    ),
}
# Default --modes per suite: the GPU anchors give forward and backward apart.
SUITE_MODES = {"gpu": ("fwd", "bwd")}
DEFAULT_MODES = ("fwd", "fwdbwd")


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked case; the sequence length is the same for queries and keys."""

    dtype: torch.dtype
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    mode: str

    @property
    def dtype_name(self):
        return DTYPE_NAMES[self.dtype]

    @property
    def shape(self):
        return (self.batch, self.heads, self.seqlen, self.head_dim)

    q_shape = kv_shape = shape

    def label(self):
        causal = "causal" if self.causal else "full"
        return f"{self.dtype_name} {self.batch}x{self.heads}x{self.seqlen}x{self.head_dim} {causal} {self.mode}"

    def flops(self):
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal,
                               self.mode)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """A decode step: a few query tokens against a long K/V cache, Hq query heads on Hkv K/V heads, no mask.
    `kv_layout` "bshd": the cache lies (batch, key, head, dim) in memory, as FlashAttention's, and both
    libraries get (batch, head, key, dim) views of it."""

    dtype: torch.dtype
    batch: int
    heads: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    kv_layout: str = "bhsd"
    causal = False
    mode = "fwd"

    @property
    def dtype_name(self):
        return DTYPE_NAMES[self.dtype]

    @property
    def seqlen(self):  # the query length, as Config.seqlen is in the timing rows
        return self.seq_q

    @property
    def q_shape(self):
        return (self.batch, self.heads, self.seq_q, self.head_dim)

    @property
    def kv_shape(self):
        return (self.batch, self.heads_kv, self.seq_k, self.head_dim)

    def label(self):
        return (f"{self.dtype_name} decode {self.batch}x{self.heads}/{self.heads_kv}x{self.seq_q}/{self.seq_k}"
                f"x{self.head_dim}" + (" bshd K/V" if self.kv_layout == "bshd" else ""))

    def flops(self):
        return attention_flops(self.batch, self.heads, self.seq_q, self.seq_k, self.head_dim, False, "fwd")

    def kv_bytes(self):
        """Bytes of K and V: what a decode step must read at least."""
        return 2 * self.batch * self.heads_kv * self.seq_k * self.head_dim * self.dtype.itemsize


def visible_pairs(seq_q, seq_k, causal):
    """Number of (query, key) pairs a row-wise softmax sees; causal is top-left aligned (key j <= query i)."""
    if not causal:
        return seq_q * seq_k
    n = min(seq_q, seq_k)  # rows 0..n-1 see i+1 keys; the rows after them see all seq_k keys
    return n * (n + 1) // 2 + (seq_q - n) * seq_k


def attention_flops(batch, heads, seq_q, seq_k, head_dim, causal, mode):
    """4 flops per visible pair and head-dim element (two matmuls); backward is 2.5x forward, forward+backward 3.5x."""
    forward = 4 * batch * heads * head_dim * visible_pairs(seq_q, seq_k, causal)
    if mode == "fwd":
        return forward
    if mode == "bwd":
        return forward * BACKWARD_FACTOR
    if mode == "fwdbwd":
        return forward * (1 + BACKWARD_FACTOR)
    raise ValueError(f"attnext.bench: mode {mode!r} is not known (known: {', '.join(MODES)})")


def parse_list(text, known, what):
    """A comma-separated list, each item checked against `known`."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item not in known:
            raise ValueError(f"attnext.bench: {what} {item!r} is not known (known: {', '.join(known)})")
    if not items:
        raise ValueError(f"attnext.bench: empty list of {what}s")
    return items


def parse_ints(text, what):
    """A comma-separated list of positive integers, e.g. "1,2"."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"attnext.bench: {what} {text!r} is not a list of integers") from None
    if not values or min(values) < 1:
        raise ValueError(f"attnext.bench: {what} {text!r} needs integers >= 1")
    return list(dict.fromkeys(values))


def parse_shape(text, names="B,H,S,D"):
    """"B,H,S,D" (or the fields `names`) each an integer or "*" (any); returns a tuple of int or None."""
    fields = [f.strip() for f in text.split(",")]
    if len(fields) != len(names.split(",")):
        raise ValueError(f"attnext.bench: shape {text!r} is not {names}")
    try:
        shape = tuple(None if f == "*" else int(f) for f in fields)
    except ValueError:
        raise ValueError(f"attnext.bench: shape {text!r} is not {names} (integers, or * for any)") from None
    if any(x is not None and x <= 0 for x in shape):
        raise ValueError(f"attnext.bench: shape {text!r} has a size <= 0")
    return shape


def select_shapes(spec, suite_shapes, names="B,H,S,D", option="--shapes"):
    """--shapes "B,H,S,D;...": concrete entries replace the suite's shapes, entries with "*" pick from them.

    E.g. "1,4,2048,64" runs that one shape; "*,*,4096,*" keeps the suite's shapes with S = 4096.
    """
    if not spec:
        return list(suite_shapes)
    patterns = [parse_shape(part, names) for part in spec.split(";") if part.strip()]
    chosen = [p for p in patterns if None not in p]
    for pattern in (p for p in patterns if None in p):
        for shape in suite_shapes:
            if all(want is None or want == got for want, got in zip(pattern, shape)) and shape not in chosen:
                chosen.append(shape)
    if not chosen:
        raise ValueError(f"attnext.bench: {option} {spec!r} selects no shape (suite shapes: {suite_shapes})")
    return chosen


def build_configs(shapes, dtypes, modes, causals):
    """All combinations, ordered for reading: mode, then dtype, then shape, then causal."""
    return [Config(DTYPES[dtype], b, h, s, d, causal, mode)
            for mode in modes for dtype in dtypes for (b, h, s, d) in shapes for causal in causals]
