"""Denoising steps through CUDA graphs: a decoder pass captured once per shape and replayed for every step.

Owns `CanvasDecoder`: `net.decode` against a cache that does not change while one canvas is denoised. On a CUDA
device each pass replays a CUDA graph (one launch instead of thousands, which is what bounds a step when the GPU
waits on the host). The cache is padded on the left to a multiple of BUCKET_CANVASES canvases first (row offsets
keep positions), so consecutive canvases of one generation share graphs (the padding costs a little attention).
Graphs are kept per network for one shape at a time, (batch, bucketed length, weight storage): a pass without
self-conditioning (a canvas's first step) and one with it. They read static buffers: the canvas, the self-conditioning
logits, and a copy of the cache's keys, values, valid mask and row offsets, which each canvas refills once, so
repeated runs of one shape (a benchmark, a server with same-length prompts) capture nothing. A new shape replaces
the graphs (their memory, about one pass's activations each, is bounded that way). Each capture is preceded by one
eager pass on the capture stream (lazy library set-up and Triton compilation must not happen inside a capture),
whose result that step uses. A capture that fails leaves a warning and eager passes for the rest of the process.
One canvas at a time holds a network's graphs (from its first pass to its decoder's `close`); a canvas denoised
meanwhile (a generation nested in a step callback, or another thread's) runs eagerly and leaves them alone.
Elsewhere (the CPU, or DGEMMA_CUDA_GRAPHS=0) every step is the plain eager pass, into reused logits buffers.
Must not: sample, or change what a pass computes: a replay runs the very kernels the eager pass launches.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Callable

import torch

from ..model.diffusion_gemma import DiffusionGemma
from .cache import KVCache

CUDA_GRAPHS = os.environ.get("DGEMMA_CUDA_GRAPHS", "1") != "0"
BUCKET_CANVASES = 4  # cached lengths are padded up to a multiple of this many canvases for the graphs' shapes
_streams: dict[torch.device, torch.cuda.Stream] = {}  # one capture stream per device


def use_graphs(device: torch.device) -> bool:
    """Whether denoising steps on `device` go through CUDA graphs."""
    return device.type == "cuda" and CUDA_GRAPHS


def capture_cuda_graph(fn: Callable[[], torch.Tensor], device: torch.device):
    """Capture `fn` (reading and writing only tensors that outlive the graph) -> (replay, output, first result).
    An eager pass on the capture stream comes first (lazy library set-up, Triton compilation and cuBLAS workspaces
    must not happen inside the capture); `first result` is its value."""
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        first = fn()
    current.wait_stream(stream)
    first.record_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph.replay, out, first


class _Graphs:
    """The graphs of one shape and the static buffers they read."""

    def __init__(self, key: tuple, cache: KVCache, canvas: torch.Tensor):
        self.key = key
        self.cache = cache.snapshot()  # its own tensors, refilled from each canvas's cache
        self.cache.keys = [None if k is None else k.clone() for k in cache.keys]
        self.cache.values = [None if v is None else v.clone() for v in cache.values]
        self.cache.valid = cache.valid.clone()
        self.cache.offset = cache.offset.clone()
        self.canvas = canvas.clone()
        self.sc_logits: torch.Tensor | None = None  # made with the first self-conditioned pass
        self.passes: dict[bool, tuple[Callable, torch.Tensor]] = {}  # with self-conditioning? -> (replay, output)
        self.holder: CanvasDecoder | None = None  # the open decoder whose cache is loaded and whose output is live

    def load(self, cache: KVCache) -> None:
        """Refill the static cache from `cache`."""
        for static, new in zip(self.cache.keys + self.cache.values, cache.keys + cache.values):
            if static is not None:
                static.copy_(new)
        self.cache.valid.copy_(cache.valid)
        self.cache.offset.copy_(cache.offset)


def _weights(net: DiffusionGemma) -> int:
    """A fingerprint of where and how the network's tensors are stored: quantizing or reloading the weights changes
    it, so graphs that read the old storage are never replayed (updates in place, as training makes, keep it)."""
    return hash(tuple((t.data_ptr(), t.dtype, t.shape) for t in [*net.parameters(), *net.buffers()]))


def _bucketed(cache: KVCache, canvas_length: int) -> KVCache:
    """`cache` padded on the left to a multiple of BUCKET_CANVASES canvases, with row offsets keeping every position:
    consecutive canvases of one generation (a canvas longer each) then share graphs instead of capturing new ones."""
    bucket = BUCKET_CANVASES * canvas_length  # 0: no padding
    padded = cache.pad_left(-cache.length % bucket if bucket else 0).snapshot()
    if padded.offset is None:
        padded.offset = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.valid.device)
    return padded


_graphs: weakref.WeakKeyDictionary[DiffusionGemma, _Graphs] = weakref.WeakKeyDictionary()  # one shape per network
_failed: weakref.WeakSet[DiffusionGemma] = weakref.WeakSet()  # networks whose capture failed once: no more attempts


class CanvasDecoder:
    """`decoder(canvas [B, C], sc_logits [B, C, V] or None) -> logits [B, C, V]`, the same as
    `net.decode(canvas, cache, sc_logits)`, through CUDA graphs where `use_graphs` says so. The logits are a buffer
    the decoder reuses: a replay's is the graph's output buffer, which the next pass overwrites; an eager pass writes
    into one of two buffers taken in turn (with a third for the self-conditioning softmax), which the pass after next
    overwrites. The engine reads them before its next call; the rows it keeps frozen only feed them back as
    self-conditioning, whose result it discards."""

    capture: Callable = staticmethod(capture_cuda_graph)  # (fn, device) -> (replay, output, first result)

    def __init__(self, net: DiffusionGemma, cache: KVCache):
        self.net, self.cache = net, cache
        self.graphs = use_graphs(net.device)
        if self.graphs:
            self.cache = _bucketed(cache, net.config.canvas_length)
        self._weights = _weights(net) if self.graphs else None
        self._held: _Graphs | None = None  # the graphs this decoder holds until `close`
        self._buffers: list[torch.Tensor] = []  # eager passes: two logits buffers taken in turn, then the softmax's
        self._turn = 0

    def _eager(self, canvas: torch.Tensor, sc_logits: torch.Tensor | None) -> torch.Tensor:
        shape = (*canvas.shape, self.net.config.vocab_size)
        if not self._buffers or self._buffers[0].shape != shape:
            self._buffers = [torch.empty(shape, dtype=torch.float32, device=canvas.device) for _ in range(3)]
        out, self._turn = self._buffers[self._turn], 1 - self._turn
        return self.net.decode(canvas, self.cache, sc_logits, out=out, probs=self._buffers[2])

    def __call__(self, canvas: torch.Tensor, sc_logits: torch.Tensor | None) -> torch.Tensor:
        graphs = _graphs.get(self.net)
        if not self.graphs or self.net in _failed or graphs is not None and graphs.holder not in (None, self):
            # Another canvas is being denoised through the graphs (a generation nested in an on_step callback, or
            # another thread's): its cache and its last output stay as they are, and this one runs eagerly.
            return self._eager(canvas, sc_logits)
        key = (tuple(canvas.shape), self.cache.length, tuple(k is None for k in self.cache.keys), self._weights)
        if graphs is None or graphs.key != key:
            _graphs.pop(self.net, None)  # free the old shape's graphs before capturing new ones
            graphs = _graphs[self.net] = _Graphs(key, self.cache, canvas)
            graphs.holder = self
        if graphs.holder is not self:
            graphs.load(self.cache)
            graphs.holder = self
        self._held = graphs
        conditioned = sc_logits is not None
        graphs.canvas.copy_(canvas)
        if conditioned:
            if graphs.sc_logits is None:
                graphs.sc_logits = torch.empty_like(sc_logits)
            graphs.sc_logits.copy_(sc_logits)
        if conditioned not in graphs.passes:
            first = self._capture(graphs, conditioned)
            if first is not None:
                return first
            if self.net in _failed:
                return self._eager(canvas, sc_logits)
        replay, out = graphs.passes[conditioned]
        replay()
        return out

    def close(self) -> None:
        """End this canvas: the graphs it held may load another decoder's cache from now on."""
        if self._held is not None and self._held.holder is self:
            self._held.holder = None
        self._held = None

    def _capture(self, graphs: _Graphs, conditioned: bool) -> torch.Tensor | None:
        sc = graphs.sc_logits if conditioned else None
        try:
            replay, out, first = self.capture(lambda: self.net.decode(graphs.canvas, graphs.cache, sc),
                                              self.net.device)
        except Exception as err:  # any capture failure: keep generating, eagerly
            _failed.add(self.net)
            _graphs.pop(self.net, None)
            warnings.warn(f"CUDA graph capture of the denoising step failed ({type(err).__name__}: {err}); "
                          "running the steps eagerly", RuntimeWarning, stacklevel=3)
            return None
        graphs.passes[conditioned] = (replay, out)
        return first
