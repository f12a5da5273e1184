"""Greedy decoding whose steps replay one captured CUDA graph (the prefill stays eager).

A decode step of a 7B model is ~1-2k kernel launches and as many Python calls; at small batches the
step takes the host's time, not the GPU's. A CUDA graph replays the captured launches at once, but
it replays fixed addresses and fixed launch arguments, so the cache must keep its tensors in place
and carry its growing lengths on the device: a `DecoQuantCache` made static (`make_static`: packed
buffers at their full capacity, a fixed exact window, device-side bounds; a block is compressed every
`block_size` steps between two replays) or transformers' `StaticCache`.

Sequences of one length (no padding); greedy (argmax) tokens; a fixed number of new tokens.
"""

from __future__ import annotations

import torch
from .transformers import cache_kwargs


def _check_cache(cache) -> None:
    if hasattr(cache, "make_static"):
        return
    from transformers import StaticCache

    if not isinstance(cache, StaticCache):
        raise ValueError(f"graph decoding needs a cache that keeps its tensors in place: a fused DecoQuantCache or "
                         f"transformers' StaticCache, got {type(cache).__name__}")


class GraphDecoder:
    """Greedy decode steps of `model` over a prefilled `cache`.

    next_tokens: long [B], the tokens the first step feeds (the prefill's argmax); position: the number of
    tokens the cache holds; steps: how many steps will run (a DecoQuantCache reserves their capacity).
    cuda_graph: capture the step once (after one eager warm-up step) and replay it; default: on CUDA.
    Without it the same static steps run eagerly (CPU, tests). `step()` returns the step's argmax [B];
    `logits` holds its logits [B, vocab] until the next step.
    """

    def __init__(self, model, cache, next_tokens: torch.Tensor, position: int, steps: int,
                 cuda_graph: bool | None = None):
        if next_tokens.dim() != 1:
            raise ValueError(f"next_tokens must be [batch], got shape {tuple(next_tokens.shape)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cuda = next_tokens.device.type == "cuda"
        self.cuda_graph = cuda if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and not cuda:
            raise ValueError("cuda_graph=True needs the model and tokens on a CUDA device")
        _check_cache(cache)
        self.model, self.cache = model, cache
        self.ids = next_tokens[:, None].clone()  # [B, 1]: static inputs of the captured step
        self.positions = torch.full_like(self.ids, position)
        self.remaining = steps
        self.logits = None
        self._graph = None
        self._warm = False
        self._static = hasattr(cache, "make_static")
        if self._static:
            cache.make_static(steps)

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.positions, **cache_kwargs(self.cache), use_cache=True)
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        if self.remaining <= 0:
            raise RuntimeError("the decoder ran the steps it was made for; make a new one")
        if self._graph is not None:
            self._graph.replay()
        elif self.cuda_graph and self._warm:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self.logits = self._forward()
            self._graph.replay()  # the capture records the step; the replay runs it
        elif self.cuda_graph:  # warm-up (compiles the kernels) on a side stream, as capture wants
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.logits = self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self._warm = True
        else:
            self.logits = self._forward()
        self.remaining -= 1
        if self._static and self.cache.is_static and not self.cache.advance():
            self._graph, self.cuda_graph = None, False  # a block stayed exact: eager from here on
        tokens = self.logits.argmax(-1)
        self.ids.copy_(tokens[:, None])
        self.positions.add_(1)
        return tokens


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, past_key_values, max_new_tokens: int,
             cuda_graph: bool | None = None) -> torch.Tensor:
    """Greedy generation: an eager prefill of input_ids [B, T] (no padding) into past_key_values, then
    max_new_tokens - 1 decode steps replayed from a CUDA graph (see GraphDecoder). Returns [B, T + max_new_tokens].

    past_key_values: a DecoQuantCache with fused=True (the model's attention through
    `decoquant.enable_fused_attention`) or transformers' StaticCache, empty."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_cache(past_key_values)
    out = model(input_ids=input_ids, **cache_kwargs(past_key_values), use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    if max_new_tokens > 1:
        decoder = GraphDecoder(model, past_key_values, tokens[0], input_ids.shape[1], max_new_tokens - 1, cuda_graph)
        tokens += [decoder.step() for _ in range(max_new_tokens - 1)]
    return torch.cat([input_ids, torch.stack(tokens, 1)], 1)
