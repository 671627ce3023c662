"""Runs a Qwen3ForCausalLM: KV cache, prefill, decode, CUDA graphs, generate().

State lives on the device: the KV cache [max_batch, Hkv, max_seq_len, D] per layer, and
``positions`` [max_batch] (int32), the position the next decoded token of each sequence takes.
A decode step reads and then increments ``positions`` on the device, so a captured graph
replays correctly step after step without any host involvement.

CUDA graphs are captured lazily, one per (batch size, fusion flags): flipping
``model.flags`` between steps selects (or captures) the graph of the other path. The first
step of a new key runs eagerly (that warms up and compiles every kernel), the next captures.
"""

from __future__ import annotations

import warnings

import torch

from engine.qwen3 import Qwen3ForCausalLM, StepContext
from engine.sampler import sample
from kernels.markers import mark


class _DecodeGraph:
    def __init__(self, graph, token_ids: torch.Tensor, logits: torch.Tensor):
        self.graph = graph
        self.token_ids = token_ids  # static input buffer [B]
        self.logits = logits  # static output buffer [B, V]


class Runner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        *,
        max_batch_size: int = 1,
        max_seq_len: int = 1024,
        cuda_graph: bool = False,
    ):
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError("max_batch_size and max_seq_len must be >= 1")
        limit = model.config.max_position_embeddings
        if max_seq_len > limit:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings {limit}")
        self.model = model.eval()
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = model.device
        self.cuda_graph = cuda_graph
        if cuda_graph and self.device.type != "cuda":
            warnings.warn(
                f"cuda_graph=True but the model is on {self.device}: decoding eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
        c = model.config
        cache_shape = (max_batch_size, c.num_key_value_heads, max_seq_len, c.head_dim)
        for layer in model.model.layers:
            layer.self_attn.k_cache = torch.zeros(
                cache_shape, dtype=model.dtype, device=self.device
            )
            layer.self_attn.v_cache = torch.zeros(
                cache_shape, dtype=model.dtype, device=self.device
            )
        self.positions = torch.zeros(max_batch_size, dtype=torch.int32, device=self.device)
        # Host-side mirror of the positions (same for all sequences of a batch): bounds checks
        # without reading the device.
        self._next_position = 0
        self._batch_size = 0
        self._graphs: dict[tuple, _DecodeGraph | None] = {}
        self._graph_pool = None

    # ---------------------------------------------------------------------------------------
    # Prefill and decode
    # ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt [B, P] at positions 0..P-1 (resets these sequences) -> last logits [B, V]."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [batch, prompt_len], got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        B, P = input_ids.shape
        self._check_batch(B)
        if not 1 <= P <= self.max_seq_len:
            raise ValueError(f"prompt length {P} must be in 1..max_seq_len ({self.max_seq_len})")
        input_ids = input_ids.to(self.device)
        positions = torch.arange(P, dtype=torch.int32, device=self.device).repeat(B)
        ctx = StepContext(batch_size=B, tokens_per_seq=P, positions=positions, is_prefill=True)
        logits = self.model(input_ids.reshape(-1), ctx)
        self.positions[:B].fill_(P)
        self._next_position, self._batch_size = P, B
        return logits

    def rewind(self, position: int) -> None:
        """Continue the current sequences from ``position`` (<= where they are): the next
        decoded token takes that position, overwriting the cache beyond it. Timing repeats
        decode from the same context this way without a new prefill."""
        if not 1 <= position <= self._next_position:
            raise ValueError(
                f"position {position} must be in 1..{self._next_position} (the current position)"
            )
        self.positions[: self._batch_size].fill_(position)
        self._next_position = position

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence [B] at each sequence's next position -> logits [B, V]."""
        self._advance(token_ids)
        with mark("decode_step"):
            if self.cuda_graph and self.device.type == "cuda":
                return self._decode_graphed(token_ids, greedy=False)
            return self._decode_eager(token_ids)

    @torch.inference_mode()
    def decode_greedy(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``decode`` and the greedy next token: token ids [B] -> next token ids [B] (int64).

        In a CUDA graph the argmax is captured too and writes the graph's own input buffer,
        which is what this returns: passing it back in, a step is one replay (no copy in, no
        logits out). The next call overwrites it: clone it to keep it."""
        self._advance(token_ids)
        with mark("decode_step"):
            if self.cuda_graph and self.device.type == "cuda":
                return self._decode_graphed(token_ids, greedy=True)
            return self._decode_eager(token_ids).argmax(-1)

    def _advance(self, token_ids: torch.Tensor) -> None:
        """Check a decode step's input and take the next position (host mirror)."""
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D [batch], got shape {tuple(token_ids.shape)}")
        B = token_ids.shape[0]
        if self._batch_size != B:
            raise ValueError(
                f"decode got {B} tokens but the last prefill had batch size {self._batch_size}"
            )
        if self._next_position >= self.max_seq_len:
            raise ValueError(f"the KV cache is full (max_seq_len {self.max_seq_len})")
        self._next_position += 1

    def _decode_eager(self, token_ids: torch.Tensor) -> torch.Tensor:
        B = token_ids.shape[0]
        positions = self.positions[:B]
        ctx = StepContext(batch_size=B, tokens_per_seq=1, positions=positions, is_prefill=False)
        logits = self.model(token_ids.to(self.device), ctx)
        positions.add_(1)
        return logits

    def _decode_graphed(self, token_ids: torch.Tensor, greedy: bool) -> torch.Tensor:
        B = token_ids.shape[0]
        # A greedy step's graph holds the argmax too: a key of its own.
        key = (B, self.model.flags.key(), "greedy") if greedy else (B, self.model.flags.key())
        if key not in self._graphs:
            # First step of this key: eager on a side stream (warms up Triton, cuBLAS), then
            # capture. Capture executes nothing, so the state the eager step left is kept.
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                out = self._decode_eager(token_ids)
                if greedy:
                    out = out.argmax(-1)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._graphs[key] = self._capture(B, greedy)
            return out
        entry = self._graphs[key]
        if entry is None:  # capture failed before (warned once)
            out = self._decode_eager(token_ids)
            return out.argmax(-1) if greedy else out
        if token_ids.data_ptr() != entry.token_ids.data_ptr():
            entry.token_ids.copy_(token_ids, non_blocking=True)
        entry.graph.replay()
        if greedy:
            return entry.token_ids  # the next token, already where the next replay reads it
        return entry.logits.clone()  # the next replay overwrites the static buffer

    def _capture(self, B: int, greedy: bool = False) -> _DecodeGraph | None:
        try:
            token_ids = torch.zeros(B, dtype=torch.int64, device=self.device)
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                logits = self._decode_eager(token_ids)
                if greedy:
                    token_ids.copy_(logits.argmax(-1))
            return _DecodeGraph(graph, token_ids, logits)
        except Exception as exc:
            warnings.warn(
                f"CUDA graph capture failed for batch size {B}, flags {self.model.flags}: "
                f"{type(exc).__name__}: {exc}. Decoding this key eagerly.",
                RuntimeWarning,
                stacklevel=3,
            )
            torch.cuda.synchronize(self.device)
            return None

    @property
    def captured_graphs(self) -> list[tuple]:
        """Keys (batch size, flags) of the decode graphs captured so far (failed ones left out)."""
        return [key for key, entry in self._graphs.items() if entry is not None]

    def _check_batch(self, B: int) -> None:
        if not 1 <= B <= self.max_batch_size:
            raise ValueError(f"batch size {B} must be in 1..max_batch_size ({self.max_batch_size})")

    # ---------------------------------------------------------------------------------------
    # Generation
    # ---------------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Prefill the prompt [B, P], then decode: returns the new tokens [B, max_new_tokens].

        Greedy at temperature 0; otherwise sampling (``top_k``, ``generator`` optional).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt_len], got {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + max_new_tokens - 1
        if total > self.max_seq_len:
            raise ValueError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) needs "
                f"{total} cache positions; max_seq_len is {self.max_seq_len}"
            )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_new_tokens, unit="tok", desc="generate")
        try:
            tokens = [sample(self.prefill(input_ids), temperature, top_k, generator)]
            if bar is not None:
                bar.update(1)
            token = tokens[-1]
            for _ in range(max_new_tokens - 1):
                if temperature == 0:
                    token = self.decode_greedy(token)  # the argmax inside the graph
                    tokens.append(token.clone())
                else:
                    token = sample(self.decode(token), temperature, top_k, generator)
                    tokens.append(token)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return torch.stack(tokens, dim=1)
