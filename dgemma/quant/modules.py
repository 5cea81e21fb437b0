"""Quantized drop-in modules, swapped into a built `DiffusionGemma`; the model code never learns about them.

- `QuantLinear` replaces an `nn.Linear` (attention q/k/v/o, dense and self-conditioning MLPs; the router stays float).
- `QuantExperts` replaces `Experts`: same routing code; its `_mlp` runs all experts at once (on a GPU with Triton, one
  grouped launch per product, int8/int4 weights; on the CPU, int4 weights through PyTorch's packed int4 kernel where
  the CPU has it, others in grouped products over a few dequantized experts at a time), else each expert through the
  quantized kernel.
- `QuantEmbedding` replaces the tied `embed_tokens`: lookups dequantize only the rows asked for, and its `.weight`
  (used by the model as the LM head and for self-conditioning's soft embeddings) is a `QuantWeight` view.
A quantized weight `w` lives in three buffers, `w_codes`, `w_scale` and `w_offset` (when it has offsets; int4 experts
in the CPU kernel's order keep their codes in `w_kernel_codes` instead, see `QuantExperts`); reading
the attribute `w` gives a `QuantWeight`, a storage-less tensor that dispatches F.linear, matmul, F.embedding and
indexing of its first dimension to `dgemma.kernels.dequant_matmul` and refuses anything else. `compute_dtype` is the
activation dtype, fixed when the model is built: choose the dtype at load time, not with `.to(dtype)` afterwards (that
would cast scales and FP8 codes). Moving devices with `.to(device)` is fine.

Also here: which checkpoint tensors are quantized (`role`), `quantize_model` (in-memory swap of a float model) and
`build` (a model assembled tensor by tensor from float and quantized entries, for every quantized loader).
Must not: read or write files.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import dequant_matmul as kernels
from ..kernels import int4_cpu
from ..kernels import triton_dequant
from ..model.diffusion_gemma import DiffusionGemma
from ..model.layers import Experts, gated_mlp, triton_mlp
from .formats import QTensor, dequantize, quantize

_LINEAR = re.compile(r"(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|"
                     r"self_conditioning\.(gate|up|down)_proj)\.weight$")
_EXPERTS = re.compile(r"layers\.\d+\.experts\.(gate_up_proj|down_proj)$")
EMBEDDING = "embed_tokens.weight"


def role(target: str) -> str | None:
    """"linear", "experts" or "embedding" for a parameter name that may be quantized; None for the rest (norms,
    router, scales, layer scalars), which stay float."""
    if _LINEAR.fullmatch(target):
        return "linear"
    if _EXPERTS.fullmatch(target):
        return "experts"
    return "embedding" if target == EMBEDDING else None


def weight_kind(weight_role: str | None, fmt: str, dense: str | None, embedding: str | None) -> str | None:
    """The format a weight of `weight_role` takes: the experts `fmt`, the other linears (attention, dense and
    self-conditioning MLPs) `dense` (None = `fmt`), the tied embedding `embedding`; None (stays float) for the rest."""
    return {"experts": fmt, "linear": dense or fmt, "embedding": embedding}.get(weight_role)


_METADATA = ("dim", "size", "numel", "element_size", "is_floating_point", "__len__")


class QuantWeight(torch.Tensor):
    """A read-only float view [..., N, K] of a QTensor in `dtype`, without storage of its own."""

    @staticmethod
    def __new__(cls, q: QTensor, dtype: torch.dtype, load=None):
        return torch.Tensor._make_wrapper_subclass(cls, q.shape, dtype=dtype, device=q.codes.device)

    def __init__(self, q: QTensor, dtype: torch.dtype, load=None):
        """`q` gives the metadata; `load()`, where given, the QTensor in dgemma's layout when data is needed (for a
        weight stored in another order, converted on each use)."""
        self._stored, self._load = q, load

    @property
    def q(self) -> QTensor:
        return self._stored if self._load is None else self._load()

    def __repr__(self) -> str:
        q = self._stored
        return f"QuantWeight({q.kind}, shape={tuple(q.shape)}, group={q.group_size})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "__get__" or name in _METADATA:  # shape, dtype, device, dim(), ...: no data needed
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is F.linear and len(args) == 2 and not kwargs and _plain(args[0]) and isinstance(args[1], cls):
            return kernels.linear(args[0], args[1].q)
        if name in ("matmul", "__matmul__") and len(args) == 2 and _plain(args[0]) and isinstance(args[1], cls):
            return kernels.matmul(args[0], args[1].q)
        if func is F.embedding and isinstance(args[1], cls) and not kwargs.get("max_norm"):
            return kernels.embedding(args[0], args[1].q, args[1].dtype)
        if name == "__getitem__" and isinstance(args[0], cls) and isinstance(args[1], int) and \
                args[0]._stored.codes.dim() > 2:
            return cls(args[0].q.map(lambda t: t[args[1]]), args[0].dtype)
        raise TypeError(f"a quantized weight does not support {name}(); only linear, matmul, embedding and "
                        "indexing the expert dimension are fused (dequantize it first)")


    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"a quantized weight has no storage for {func}; dequantize it first")


def _plain(x) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, QuantWeight)


class _Quantized:
    """Mixin for modules whose weights may be quantized: `w_codes`/`w_scale`/`w_offset` buffers read as `w`."""

    compute_dtype: torch.dtype

    def set_weight(self, name: str, value: QTensor | torch.Tensor) -> None:
        """Store `value` as weight `name`: a QTensor in its three buffers, a float tensor as a plain buffer."""
        self._kinds.pop(name, None)
        for suffix in ("", "_codes", "_scale", "_offset"):
            self._buffers.pop(name + suffix, None)
            self._parameters.pop(name + suffix, None)
        if isinstance(value, QTensor):
            self.register_buffer(name + "_codes", value.codes)
            self.register_buffer(name + "_scale", value.scale)
            if value.offset is not None:
                self.register_buffer(name + "_offset", value.offset)
            self._kinds[name] = value.kind
        else:
            self.register_buffer(name, value.detach())

    def qtensor(self, name: str) -> QTensor | None:
        if name not in self._kinds:
            return None
        b = self._buffers
        return QTensor(self._kinds[name], b[name + "_codes"], b[name + "_scale"], b.get(name + "_offset"))

    def _view(self, name: str) -> QuantWeight:
        return QuantWeight(self.qtensor(name), self.compute_dtype)

    def __getattr__(self, name: str):
        kinds = self.__dict__.get("_kinds")
        if kinds is not None and name in kinds:
            return self._view(name)
        return super().__getattr__(name)


class QuantLinear(_Quantized, nn.Module):
    """y = x W^T with W quantized; same call and output dtype as `nn.Linear(in, out, bias=False)`."""

    def __init__(self, q: QTensor, compute_dtype: torch.dtype):
        super().__init__()
        self._kinds: dict[str, str] = {}
        self.compute_dtype = compute_dtype
        self.set_weight("weight", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.qtensor("weight"))

    def extra_repr(self) -> str:
        q = self.qtensor("weight")
        return f"{q.kind}, in={q.in_features}, out={q.shape[0]}, group={q.group_size}"


class QuantExperts(_Quantized, Experts):
    """`Experts` whose gate_up_proj [E, 2I, H] and down_proj [E, H, I] may each be quantized or float. Routing is
    inherited. The products run, on a GPU with Triton and both weights int8/int4, every expert in one grouped Triton
    launch per product (`_grouped_mlp`); on the CPU with both weights quantized, each product either through PyTorch's
    packed int4 kernel (`kernels.int4_cpu`) or in grouped products over a few dequantized experts at a time
    (`kernels.grouped_linear`: one call per tile of experts, not per expert); else expert by expert through the
    quantized kernel.
    On a CPU the kernel supports (`int4_cpu.supported`), an int4 weight set next to a quantized one is stored in the
    kernel's nibble order, in the buffer `<name>_kernel_codes` instead of `<name>_codes` (`_kernel_layout` names those
    weights; a state dict holding them loads nowhere by mistake). `qtensor` gives dgemma's layout, a converted copy of
    the whole stack; one expert's product (`_product`) converts only that expert. Moving the module off the CPU
    (`.to`, `.cuda`) converts back there; staying on it (`share_memory`, `.float()`) keeps the kernel's order. Products
    that autograd records take the dequantizing path, converting first (the kernel has no backward)."""

    def __init__(self, gate_up: QTensor | torch.Tensor, down: QTensor | torch.Tensor, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self._kinds: dict[str, str] = {}
        self._kernel_layout: set[str] = set()
        self.compute_dtype = compute_dtype
        self.set_weight("gate_up_proj", gate_up)
        self.set_weight("down_proj", down)

    def set_weight(self, name: str, value: QTensor | torch.Tensor) -> None:
        self._kernel_layout.discard(name)
        self._buffers.pop(name + "_kernel_codes", None)
        super().set_weight(name, value)
        self._adopt_kernel_layout()

    def _adopt_kernel_layout(self) -> None:
        """Store each int4 weight in the CPU kernel's order where `int4_cpu.supported` and the other weight is
        quantized too (a half-float module is a conversion in progress)."""
        for name, other in (("gate_up_proj", "down_proj"), ("down_proj", "gate_up_proj")):
            if name in self._kernel_layout or other not in self._kinds:
                continue
            q = _Quantized.qtensor(self, name)
            if q is not None and int4_cpu.supported(q):
                self._buffers[name + "_kernel_codes"] = int4_cpu.to_kernel_layout(q.codes, q.group_size)
                del self._buffers[name + "_codes"]
                self._kernel_layout.add(name)

    def _stored(self, name: str) -> QTensor:
        """Weight `name` as stored: for one in `_kernel_layout`, its codes in the kernel's order."""
        b = self._buffers
        return QTensor("int4", b[name + "_kernel_codes"], b[name + "_scale"], b[name + "_offset"])

    def qtensor(self, name: str) -> QTensor | None:
        """Weight `name` in dgemma's layout (a converted copy where it is stored in the CPU kernel's order)."""
        if name not in self._kernel_layout:
            return super().qtensor(name)
        q = self._stored(name)
        return QTensor(q.kind, int4_cpu.from_kernel_layout(q.codes, q.group_size), q.scale, q.offset)

    def _view(self, name: str) -> QuantWeight:
        if name not in self._kernel_layout:
            return super()._view(name)
        return QuantWeight(self._stored(name), self.compute_dtype, lambda: self.qtensor(name))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in list(self._kernel_layout):
            q = self._stored(name)
            if q.codes.device.type != "cpu":  # moved off the CPU: back to dgemma's layout, which every device reads
                self._buffers[name + "_codes"] = int4_cpu.from_kernel_layout(q.codes, q.group_size)
                del self._buffers[name + "_kernel_codes"]
                self._kernel_layout.discard(name)
        self._adopt_kernel_layout()  # moved onto the CPU
        return self

    def _product(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """x [P, K] @ weight `name`[expert]^T -> [P, N]."""
        if name in self._kernel_layout:
            q = self._stored(name).map(lambda t: t[expert:expert + 1])  # [1, N, K]: this expert alone
            q = QTensor(q.kind, int4_cpu.from_kernel_layout(q.codes, q.group_size), q.scale, q.offset)
            return kernels.linear(x, q.map(lambda t: t[0]))
        q = self.qtensor(name)
        if q is None:
            return F.linear(x, self._buffers[name][expert])
        return kernels.linear(x, q.map(lambda t: t[expert]))

    def _mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [P, H] grouped by expert with counts [E] -> [P, H]."""
        if xs.is_cuda and triton_dequant.available(xs) and \
                all(self._kinds.get(name) in triton_dequant.KINDS for name in ("gate_up_proj", "down_proj")):
            return self._grouped_mlp(xs, counts)
        if xs.is_cuda:
            return self._expert_loop(xs, counts)
        return gated_mlp(xs, self._cpu_product(xs, counts, "gate_up_proj"), self._cpu_product(xs, counts, "down_proj"))

    def _cpu_product(self, xs: torch.Tensor, counts: torch.Tensor, name: str):
        """A function x -> the grouped product of x with weight `name` on the CPU: the packed int4 kernel where the
        weight is in its order, autograd records nothing and `kernels.FUSED` is on, grouped dequantizing products where `kernels.grouped_ok`
        takes the weight, else expert by expert (`_product`)."""
        stored = self._stored(name) if name in self._kernel_layout else _Quantized.qtensor(self, name)
        if name in self._kernel_layout and kernels.FUSED and not (torch.is_grad_enabled() and xs.requires_grad):
            return lambda x: int4_cpu.grouped_linear(x, counts, stored)
        if stored is not None and kernels.grouped_ok(xs, stored):
            q = self.qtensor(name)  # in dgemma's layout
            return lambda x: kernels.grouped_linear(x, counts, q)
        bounds = [0] + counts.cumsum(0).tolist()

        def by_expert(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self._product(x[lo:hi], name, e)
                              for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo])
        return by_expert

    def _grouped_mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`_mlp` with one grouped Triton launch per product; both weights int8/int4, needs `available(xs)`."""
        return triton_mlp(xs, counts, self.qtensor("gate_up_proj"), self.qtensor("down_proj"))


class QuantEmbedding(_Quantized, nn.Module):
    """The tied embedding [V, H] stored quantized; `.weight` is a QuantWeight view."""

    def __init__(self, q: QTensor, compute_dtype: torch.dtype):
        super().__init__()
        self._kinds: dict[str, str] = {}
        self.compute_dtype = compute_dtype
        self.set_weight("weight", q)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embedding(ids, self.qtensor("weight"), self.compute_dtype)


def is_quantized(net: nn.Module) -> bool:
    """Whether any weight of `net` is stored quantized."""
    return any(isinstance(m, _Quantized) for m in net.modules())


def _parent(net: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    module = net
    for part in path:
        module = getattr(module, part)
    return module, leaf


def _swap(net: DiffusionGemma, target: str, value: QTensor, dtype: torch.dtype) -> None:
    """Put quantized `value` in place of parameter `target`, replacing its module (an expert module keeps its other
    weight as it is)."""
    kind = role(target)
    module_name = target.rsplit(".", 1)[0]
    parent, leaf = _parent(net, module_name)
    module = getattr(parent, leaf)
    if kind == "experts":
        if not isinstance(module, QuantExperts):
            module = QuantExperts(module.gate_up_proj, module.down_proj, dtype)
            setattr(parent, leaf, module)
        module.set_weight(target.rsplit(".", 1)[1], value)
    elif kind == "linear":
        setattr(parent, leaf, QuantLinear(value, dtype))
    else:
        setattr(parent, leaf, QuantEmbedding(value, dtype))


@torch.no_grad()
def quantize_model(net: DiffusionGemma, kind: str, group_size: int | None = None,
                   embedding: str | None = "int8", dense: str | None = None,
                   calibrated: dict[str, QTensor] | None = None) -> DiffusionGemma:
    """Swap every quantizable weight of a loaded float model for its `kind` ("int8"/"int4") form, in place.
    `dense` ("int8" or "int4"; None = `kind`) sets the format of the linears outside the experts; `embedding`
    ("int8", "int4" or None to keep it float) the tied embedding's. `calibrated` (from `gptq.calibrate` with the same
    formats) supplies calibrated weights by name; the rest are rounded to nearest."""
    dtype = net.dtype
    for target in [name for name, _ in net.named_parameters()]:  # names only: each float weight is freed once swapped
        r = role(target)
        wanted = weight_kind(r, kind, dense, embedding)
        if wanted is None:
            continue
        module, leaf = _parent(net, target)
        weight = getattr(module, leaf)  # a parameter, or the float buffer of a half-swapped QuantExperts
        value = calibrated.get(target) if calibrated else None
        if value is None:
            value = quantize(weight, wanted, group_size)
        elif value.kind != wanted:
            raise ValueError(f"calibrated weight {target!r} is {value.kind}, but this format makes it {wanted}")
        _swap(net, target, value, dtype)
        del weight
    return net


def build(cfg: ModelConfig, entries: Iterable[tuple[str, QTensor | torch.Tensor]], dtype: torch.dtype | None,
          device: torch.device, source: str) -> DiffusionGemma:
    """Assemble a model from (parameter name, value) pairs: float tensors (cast to `dtype`, default the first one's
    dtype) and QTensors (kept as stored, moved to `device`; a quantized weight that is not a
    linear, expert or embedding weight is dequantized). Layer scalars come as "encoder_layer_scalars.N" /
    "decoder_layer_scalars.N" (one side missing: it takes the other's). `source` names the input in errors."""
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    wanted = {name: t.shape for name, t in net.state_dict().items()}
    scalars: dict[str, dict[int, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    floats: dict[str, torch.Tensor] = {}
    quantized: dict[str, QTensor] = {}
    for target, value in entries:
        if "_layer_scalars." in target:
            side, idx = target.split("_layer_scalars.")
            scalars[side][int(idx)] = value.reshape(())
            continue
        if target not in wanted:
            raise ValueError(f"{source}: unexpected tensor {target!r}")
        if tuple(value.shape) != tuple(wanted[target]):
            raise ValueError(f"{source}: tensor {target!r} has shape {tuple(value.shape)}, config implies "
                             f"{tuple(wanted[target])}")
        if isinstance(value, QTensor) and role(target) is None:  # e.g. a quantized router: run it in float
            value = dequantize(value, torch.float32)
        if isinstance(value, QTensor):
            quantized[target] = value.map(lambda t: t.to(device))
        else:
            if dtype is None:
                dtype = value.dtype
            floats[target] = value
    dtype = dtype or torch.float32
    for target, value in floats.items():
        floats[target] = value.to(device=device, dtype=dtype)
    for side, other in (("encoder", "decoder"), ("decoder", "encoder")):
        values = [scalars[side].get(i, scalars[other].get(i)) for i in range(cfg.num_hidden_layers)]
        floats[f"{side}_layer_scalars"] = torch.stack(
            [torch.ones((), dtype=dtype) if v is None else v.to(dtype) for v in values]).to(device)
    missing = [k for k in wanted if k not in floats and k not in quantized]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: missing tensor {missing[0]}{more}")
    net.load_state_dict(floats, strict=False, assign=True)
    for target in list(quantized):  # popped, so a weight stored anew (the CPU kernel's order) frees the old codes
        _swap(net, target, quantized.pop(target), dtype)
    net.requires_grad_(False)
    return net.eval()
