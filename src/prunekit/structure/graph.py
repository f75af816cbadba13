"""Dependency graph of any traceable PyTorch model: which channels must be removed together.

The model is traced with `torch.fx.symbolic_trace` and run once on example inputs (`ShapeProp`) to learn every
tensor's shape. Every tracked dimension of every tensor carries one *element* id per index; each parameter
dimension that an operation couples to a tensor dimension gets its own ids too. Operations then join elements
(union-find): a convolution's input channels with its weight's input dimension, an addition's operands index by
index, a BatchNorm's statistics with its input channels. Concatenation lays its inputs' ids side by side (the
consumer of a cat sees shifted indices), flatten repeats a channel's id over the features it becomes, chunk
joins the chunks position by position (so that they stay equal), a grouped convolution joins whole groups.

A *unit* is one class of joined elements: the slices of every parameter and buffer that go together (a channel, or
a whole group of a grouped convolution or GroupNorm). A *group* is a set of parameter dimensions linked by such
joins (a conv's output channels, its BatchNorm and every consumer's input channels, all branches of a residual
sum); its units are removed independently. An element that cannot change size is *pinned*, and so is its unit: the
network's inputs and outputs, dimensions that code fixes with literal sizes (`view(-1, 64)`, `split(x, 16)`),
reductions and softmax across channels, and the parameters of ignored modules.

LayerNorm over channels is coupled but not exact: removing a channel changes the mean and variance of the others,
so only there a removed all-zero channel can change the outputs (such groups are flagged `renormalised`).
"""

from __future__ import annotations

import math
import operator
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from prunekit.errors import PrunekitError

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                        nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
                        nn.Dropout2d, nn.Dropout3d)
# operations that keep the rank and the channel dimension and may change the others (spatial sizes)
_SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
                    nn.UpsamplingBilinear2d)
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.maximum,
    torch.minimum, torch.where, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.clamp,
    torch.zeros_like, torch.ones_like, torch.full_like, F.relu, F.relu6, F.silu, F.gelu, F.sigmoid, F.hardswish,
    F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.hardtanh,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "exp", "abs", "clamp", "clamp_", "contiguous", "clone", "float", "half", "double", "to", "detach",
    "type_as", "expand_as",
}
_SPATIAL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                      F.adaptive_max_pool2d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d,
                      F.max_pool3d, F.interpolate, F.pad}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp"}

State = dict[int, np.ndarray]


@dataclass
class Member:
    """One parameter or buffer dimension of a group: `units[i]` is the unit (within the group) that index
    `positions[i]` of dimension `dim` belongs to."""

    name: str
    dim: int
    size: int
    positions: np.ndarray
    units: np.ndarray
    is_parameter: bool

    def describe(self) -> str:
        text = f"{self.name}[dim {self.dim}]"
        if len(self.positions) != self.size:
            text += f" indices {int(self.positions.min())}..{int(self.positions.max())} of {self.size}"
        per_unit = len(self.positions) / max(1, len(np.unique(self.units)))
        if per_unit != 1:
            text += f" ({per_unit:g} per unit)"
        return text


@dataclass
class Group:
    """Coupled dimensions: removing unit `u` removes, in every member, the positions whose `units` equal `u`."""

    index: int
    units: np.ndarray  # global unit numbers, in order of first appearance
    members: list[Member] = field(default_factory=list)
    pinned: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    renormalised: bool = False

    @property
    def prunable(self) -> bool:
        return bool((~self.pinned).any())


class _Elements:
    """Union-find over channel elements; each element remembers whether it is pinned."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: list[bool] = []

    def new(self, count: int, pinned: bool = False) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.pinned.extend([pinned] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise AssertionError(f"coupling {len(a)} channels with {len(b)}")
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                self.pinned[rx] = self.pinned[rx] or self.pinned[ry]

    def pin(self, ids: np.ndarray | None) -> None:
        if ids is not None:
            for x in ids.tolist():
                self.pinned[self.find(x)] = True

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(x) for x in ids.tolist()), dtype=np.int64, count=len(ids))


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _describe(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(model.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method '.{node.target}()' (node '{node.name}')"
    return f"function '{getattr(node.target, '__name__', node.target)}' (node '{node.name}')"


def _argument(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class DependencyGraph:
    """The coupled groups of `model` on `example_inputs` (a tensor or a tuple of positional inputs).

    ignore: modules (or their names) whose parameters must not shrink; their dimensions are pinned.
    The graph describes the model as it is now; after a removal, build a new one.
    """

    def __init__(self, model: nn.Module, example_inputs, ignore: Iterable[nn.Module | str] = ()):
        self.model = model
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        try:
            self.traced = fx.symbolic_trace(model)
        except Exception as error:  # fx raises many types; the first line names the construct it met
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PrunekitError(f"torch.fx cannot trace {type(model).__name__}{_user_frame(error)}: {first}") \
                from None
        was_training = model.training
        model.eval()  # BatchNorm in training mode would update its running statistics
        try:
            with torch.no_grad():
                ShapeProp(self.traced).propagate(*inputs)
        finally:
            model.train(was_training)
        self._names = {id(t): n for n, t in model.named_parameters()}
        self._names.update({id(t): n for n, t in model.named_buffers()})
        self._elements = _Elements()
        self._param_ids: dict[tuple[str, int], np.ndarray] = {}
        self._renormalised: set[str] = set()
        self._consumers: set[tuple[str, int]] = set()
        self._states: dict[fx.Node, object] = {}
        for node in self.traced.graph.nodes:
            self._states[node] = self._visit(node)
        self.ignored = [self.module_name(item) for item in ignore]
        for prefix in self.ignored:
            for (name, _), ids in self._param_ids.items():
                if name.startswith(prefix + ".") or not prefix:
                    self._elements.pin(ids)
        self.groups = self._build_groups()

    # ---- the ids of parameter dimensions -------------------------------------------------------------------

    def module_name(self, module: nn.Module | str) -> str:
        """The name of `module` inside the model (a name is checked to exist)."""
        for name, candidate in self.model.named_modules():
            if candidate is module or name == module:
                return name
        what = repr(module) if isinstance(module, str) else f"a {type(module).__name__}"
        raise PrunekitError(f"ignore lists {what}, which is not a submodule of {type(self.model).__name__}; "
                            "pass its modules or their names")

    def _tensor_ids(self, tensor: torch.Tensor | None, dim: int, consumer: bool = False) -> np.ndarray | None:
        """The ids of dimension `dim` of a parameter or buffer, created once (a module called twice shares them).
        `consumer`: the dimension reads channels made elsewhere (a weight's input dimension)."""
        if tensor is None:
            return None
        name = self._names.get(id(tensor))
        if name is None:
            return None
        key = (name, dim)
        if consumer:
            self._consumers.add(key)
        if key not in self._param_ids:
            self._param_ids[key] = self._elements.new(tensor.shape[dim])
        return self._param_ids[key]

    def _couple(self, a: np.ndarray | None, b: np.ndarray | None) -> None:
        """Join two dimensions index by index; a dimension of fixed size (None) pins the other."""
        if a is None:
            self._elements.pin(b)
        elif b is None:
            self._elements.pin(a)
        else:
            self._elements.union(a, b)

    def _state(self, node) -> State:
        state = self._states.get(node) if isinstance(node, fx.Node) else None
        return state if isinstance(state, dict) else {}

    def _drop(self, state: State, keep: Iterable[int] = ()) -> None:
        """Pin every tracked dimension of `state` not in `keep`: their sizes can no longer follow."""
        for d, ids in state.items():
            if d not in keep:
                self._elements.pin(ids)

    # ---- operations ----------------------------------------------------------------------------------------

    def _visit(self, node: fx.Node):
        if node.op == "placeholder":
            shape = _shape(node)
            # dims after the batch dimension carry ids so that whatever they meet is pinned with them
            return None if shape is None else {d: self._elements.new(shape[d], pinned=True)
                                               for d in range(1, len(shape))}
        if node.op == "get_attr":
            tensor = self._attribute(node.target)
            if not isinstance(tensor, torch.Tensor):
                return None
            return {d: ids for d in range(tensor.dim()) if (ids := self._tensor_ids(tensor, d)) is not None}
        if node.op == "output":
            for leaf in _nodes_in(node.args[0]):
                self._drop(self._state(leaf))
            return None
        if node.op == "call_module":
            return self._module(node, self.model.get_submodule(node.target))
        if node.op == "call_method":
            return self._method(node)
        return self._function(node)

    def _attribute(self, target: str):
        value = self.model
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _module(self, node: fx.Node, m: nn.Module):
        x = node.args[0] if node.args else None
        st, in_shape, out_shape = self._state(x), _shape(x), _shape(node)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return dict(st)
        if isinstance(m, CONVOLUTIONS + TRANSPOSED_CONVOLUTIONS):
            return self._convolution(m, st, len(out_shape))
        if isinstance(m, nn.Linear):
            last = len(in_shape) - 1
            self._couple(st.get(last), self._tensor_ids(m.weight, 1, consumer=True))
            out = self._tensor_ids(m.weight, 0)
            if m.bias is not None:
                self._couple(out, self._tensor_ids(m.bias, 0))
            return {**{d: ids for d, ids in st.items() if d != last}, last: out}
        if isinstance(m, _BATCH_NORM):
            for tensor in (m.weight, m.bias, m.running_mean, m.running_var):
                if tensor is not None:
                    self._couple(st.get(1), self._tensor_ids(tensor, 0))
            return dict(st)
        if isinstance(m, nn.GroupNorm):
            channels = st.get(1)
            if channels is None or not m.affine:
                self._elements.pin(channels)
                return dict(st)
            size = m.num_channels // m.num_groups
            for g in range(m.num_groups):  # whole normalisation groups, or the others' statistics change
                block = channels[g * size:(g + 1) * size]
                self._elements.union(np.full(size, block[0]), block)
            self._couple(channels, self._tensor_ids(m.weight, 0))
            self._couple(channels, self._tensor_ids(m.bias, 0))
            return dict(st)
        if isinstance(m, nn.LayerNorm):
            k = len(m.normalized_shape)
            for j in range(k):
                d = len(in_shape) - k + j
                if not m.elementwise_affine:
                    self._elements.pin(st.get(d))
                    continue
                if st.get(d) is not None:
                    self._renormalised.add(self._names[id(m.weight)])
                self._couple(st.get(d), self._tensor_ids(m.weight, j))
                if m.bias is not None:
                    self._couple(st.get(d), self._tensor_ids(m.bias, j))
            return dict(st)
        if isinstance(m, nn.PReLU):
            if m.num_parameters > 1:
                self._couple(st.get(1), self._tensor_ids(m.weight, 0))
            return dict(st)
        if isinstance(m, _SPATIAL_MODULES):
            return self._same_rank(st, in_shape, out_shape)
        if isinstance(m, nn.Flatten):
            return self._flatten(st, in_shape, m.start_dim, m.end_dim)
        if isinstance(m, nn.Softmax | nn.LogSoftmax):
            self._elements.pin(st.get(m.dim % len(in_shape)) if m.dim is not None else None)
            return dict(st)
        raise PrunekitError(f"the dependency graph does not support {_describe(node, self.model)}; supported are "
                            "convolutions, linear layers, norms, activations, pooling and shape operations")

    def _convolution(self, m: nn.Module, st: State, ndim: int) -> State:
        transposed = isinstance(m, TRANSPOSED_CONVOLUTIONS)
        channels = st.get(1)
        if transposed:  # weight [in, out / groups, *kernel]
            full = self._tensor_ids(m.weight, 0, consumer=True)
            self._couple(channels, full)
            out = self._tensor_ids(m.bias, 0) if m.bias is not None else self._elements.new(m.out_channels)
            if m.groups == 1:
                self._couple(out, self._tensor_ids(m.weight, 1))
            in_ids, out_ids = full, out
        else:  # weight [out, in / groups, *kernel]
            out = self._tensor_ids(m.weight, 0)
            if m.bias is not None:
                self._couple(out, self._tensor_ids(m.bias, 0))
            if m.groups == 1:
                self._couple(channels, self._tensor_ids(m.weight, 1, consumer=True))
            in_ids, out_ids = channels, out
        if m.groups > 1:
            # a group's input and output channels go together: whole groups are removed (for a depthwise conv,
            # one input channel with its outputs), so that every group keeps the same width
            if in_ids is None:
                self._elements.pin(out_ids)
            else:
                n_in, n_out = m.in_channels // m.groups, m.out_channels // m.groups
                for g in range(m.groups):
                    block = np.concatenate([in_ids[g * n_in:(g + 1) * n_in], out_ids[g * n_out:(g + 1) * n_out]])
                    self._elements.union(np.full(len(block), block[0]), block)
        self._drop(st, keep=(1,))  # spatial dims: new sizes, tracked only when they came from an input
        return {1: out}

    def _elementwise(self, node: fx.Node, tensors: Sequence, skip_dim: int | None = None) -> State:
        """Broadcasting operands: equal-size dimensions are joined; a dimension of fixed size pins the result's."""
        out_shape = _shape(node)
        nd = len(out_shape)
        out: State = {}
        fixed: set[int] = set()
        for arg in tensors:
            shape, st = _shape(arg), self._state(arg)
            offset = nd - len(shape)
            for i, size in enumerate(shape):
                d = i + offset
                if d == skip_dim:
                    continue
                ids = st.get(i)
                if size != out_shape[d]:  # broadcast from size 1
                    self._elements.pin(ids)
                elif ids is None:
                    fixed.add(d)
                elif d in out:
                    self._elements.union(out[d], ids)
                else:
                    out[d] = ids
        for d in fixed:
            self._elements.pin(out.get(d))
        return out

    def _same_rank(self, st: State, in_shape, out_shape) -> State:
        kept = {d: ids for d, ids in st.items() if in_shape[d] == out_shape[d]}
        self._drop(st, keep=kept)
        return kept

    def _flatten(self, st: State, shape, start: int, end: int) -> State:
        nd = len(shape)
        start, end = start % nd, end % nd
        merged = [d for d in range(start, end + 1) if d in st]
        out = {(d if d < start else d - (end - start)): ids for d, ids in st.items() if not start <= d <= end}
        if len(merged) == 1:
            t = merged[0]
            inner = math.prod(shape[t + 1:end + 1])
            outer = math.prod(shape[start:t])
            # feature f of the merged dim holds channel (f // inner) % C: each channel spans `inner` consecutive
            # features, repeated `outer` times
            out[start] = np.tile(np.repeat(st[t], inner), outer)
        else:
            self._drop({d: st[d] for d in merged})
        return out

    def _reshape(self, node: fx.Node, x, sizes: Sequence | None) -> State:
        st, in_shape, out_shape = self._state(x), _shape(x), _shape(node)
        out: State = {}
        i = j = 0
        while i < len(in_shape) or j < len(out_shape):
            if i < len(in_shape) and in_shape[i] == 1 and not (j < len(out_shape) and out_shape[j] == 1):
                self._elements.pin(st.get(i))
                i += 1
                continue
            if j < len(out_shape) and out_shape[j] == 1 and not (i < len(in_shape) and in_shape[i] == 1):
                j += 1
                continue
            ins, outs = [i], [j]
            pi, pj = in_shape[i], out_shape[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    ins.append(i)
                    pi *= in_shape[i]
                    i += 1
                else:
                    outs.append(j)
                    pj *= out_shape[j]
                    j += 1
            if len(outs) == 1:
                merged = self._flatten({k - ins[0]: st[k] for k in ins if k in st}, in_shape[ins[0]:ins[-1] + 1],
                                       0, -1)
                if 0 in merged:
                    out[outs[0]] = merged[0]
            else:  # one dimension split into several (channels into heads): not followed
                self._drop({k: st[k] for k in ins if k in st})
        if sizes is not None and len(sizes) == len(out_shape):
            for d, size in enumerate(sizes):
                if isinstance(size, int) and size != -1:  # a literal size cannot follow a removal
                    self._elements.pin(out.get(d))
        return out

    def _split(self, node: fx.Node, x, dim: int, equal_parts: bool):
        st, shape = self._state(x), _shape(x)
        dim %= len(shape)
        outputs = node.meta["tensor_meta"]
        sizes = [tuple(meta.shape)[dim] for meta in outputs]
        ids = st.get(dim)
        if ids is not None:
            if equal_parts and len(set(sizes)) == 1:  # remove the same positions from every part
                for k in range(1, len(sizes)):
                    self._elements.union(ids[:sizes[0]], ids[k * sizes[0]:(k + 1) * sizes[0]])
            else:
                self._elements.pin(ids)
        result, start = [], 0
        for size in sizes:
            part = dict(st)
            if ids is not None:
                part[dim] = ids[start:start + size]
            start += size
            result.append(part)
        return result

    def _index(self, node: fx.Node, x, index) -> State | None:
        st, shape = self._state(x), _shape(x)
        index = index if isinstance(index, tuple) else (index,)
        if any(item is Ellipsis for item in index):
            at = index.index(Ellipsis)
            explicit = sum(1 for item in index if item is not None and item is not Ellipsis)
            index = index[:at] + (slice(None),) * (len(shape) - explicit) + index[at + 1:]
        out: State = {}
        d_in = d_out = 0
        for item in index:
            if item is None:
                d_out += 1
                continue
            ids = st.get(d_in)
            if isinstance(item, slice) and item == slice(None):
                if ids is not None:
                    out[d_out] = ids
                d_out += 1
            elif isinstance(item, int):
                self._elements.pin(ids)
            else:  # a partial slice or a tensor index picks fixed positions
                self._elements.pin(ids)
                d_out += 1
            d_in += 1
        for k in range(d_in, len(shape)):
            if k in st:
                out[d_out + k - d_in] = st[k]
        return out

    def _reduce(self, x, dims, keepdim: bool) -> State:
        st, nd = self._state(x), len(_shape(x))
        if dims is None:
            self._drop(st)
            return {}
        dims = {d % nd for d in (dims if isinstance(dims, list | tuple) else (dims,))}
        self._drop({d: st[d] for d in dims if d in st})  # a mean over channels changes with their number
        out: State = {}
        for d, ids in st.items():
            if d not in dims:
                out[d if keepdim else d - sum(1 for r in dims if r < d)] = ids
        return out

    def _method(self, node: fx.Node):
        name, x = node.target, node.args[0]
        if not _has_tensors(node):
            return None  # `x.size(1)`, `x.dim()`
        if name in _ELEMENTWISE_METHODS:
            return self._elementwise(node, [a for a in _tensor_args(node)])
        if name == "flatten":
            return self._flatten(self._state(x), _shape(x), _argument(node, 1, "start_dim", 0),
                                 _argument(node, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            sizes = node.args[1:] if len(node.args) > 2 or not isinstance(_argument(node, 1, "shape"),
                                                                           list | tuple) else node.args[1]
            return self._reshape(node, x, list(sizes))
        if name in ("squeeze", "unsqueeze"):
            return self._reshape(node, x, None)
        if name in ("permute", "transpose"):
            return self._permute(node, x, name)
        if name in _REDUCTIONS:
            return self._reduce(x, _argument(node, 1, "dim"), bool(_argument(node, 2, "keepdim", False)))
        if name == "chunk":
            return self._split(node, x, _argument(node, 2, "dim", 0), equal_parts=True)
        if name == "split":
            return self._split(node, x, _argument(node, 2, "dim", 0),
                               equal_parts=isinstance(_argument(node, 1, "split_size"), fx.Node))
        if name in ("softmax", "log_softmax"):
            st = self._state(x)
            self._elements.pin(st.get(_argument(node, 1, "dim") % len(_shape(x))))
            return dict(st)
        raise PrunekitError(f"the dependency graph does not support {_describe(node, self.model)}")

    def _permute(self, node: fx.Node, x, name: str) -> State:
        st, nd = self._state(x), len(_shape(x))
        if name == "permute":
            order = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
            order = [d % nd for d in order]
        else:
            a, b = node.args[1] % nd, node.args[2] % nd
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        return {k: st[d] for k, d in enumerate(order) if d in st}

    def _function(self, node: fx.Node):
        f = node.target
        if f is operator.getitem:
            source = self._states.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if isinstance(source, list):
                return source[node.args[1]]
            if isinstance(source, dict) and _shape(node) is not None:
                return self._index(node, node.args[0], node.args[1])
            return None
        if not _has_tensors(node):
            return None  # arithmetic on sizes, `x.shape`
        if f in _ELEMENTWISE_FUNCTIONS:
            return self._elementwise(node, _tensor_args(node))
        if f in (torch.cat, torch.concat, torch.concatenate):
            return self._cat(node)
        if f is torch.flatten:
            x = node.args[0]
            return self._flatten(self._state(x), _shape(x), _argument(node, 1, "start_dim", 0),
                                 _argument(node, 2, "end_dim", -1))
        if f is torch.reshape:
            return self._reshape(node, node.args[0], list(_argument(node, 1, "shape")))
        if f in (torch.squeeze, torch.unsqueeze):
            return self._reshape(node, node.args[0], None)
        if f in (torch.permute, torch.transpose):
            return self._permute(node, node.args[0], f.__name__)
        if f in (torch.mean, torch.sum, torch.amax, torch.amin):
            return self._reduce(node.args[0], _argument(node, 1, "dim"), bool(_argument(node, 2, "keepdim", False)))
        if f in _SPATIAL_FUNCTIONS:
            x = node.args[0]
            return self._same_rank(self._state(x), _shape(x), _shape(node))
        if f is torch.chunk:
            return self._split(node, node.args[0], _argument(node, 2, "dim", 0), equal_parts=True)
        if f is torch.split:
            return self._split(node, node.args[0], _argument(node, 2, "dim", 0),
                               equal_parts=isinstance(_argument(node, 1, "split_size_or_sections"), fx.Node))
        if f in (F.softmax, F.log_softmax, torch.softmax):
            x = node.args[0]
            st = self._state(x)
            self._elements.pin(st.get(_argument(node, 1, "dim") % len(_shape(x))))
            return dict(st)
        if f is F.linear:
            x, weight, bias = node.args[0], self._state(node.args[1]), self._state(_argument(node, 2, "bias"))
            last = len(_shape(x)) - 1
            st = self._state(x)
            self._couple(st.get(last), weight.get(1))
            if bias:
                self._couple(weight.get(0), bias.get(0))
            return {**{d: ids for d, ids in st.items() if d != last}, last: weight.get(0)}
        raise PrunekitError(f"the dependency graph does not support {_describe(node, self.model)}")

    def _cat(self, node: fx.Node) -> State:
        tensors = list(_argument(node, 0, "tensors"))
        out_shape = _shape(node)
        dim = _argument(node, 1, "dim", 0) % len(out_shape)
        parts = []
        for arg in tensors:
            ids = self._state(arg).get(dim)
            parts.append(ids if ids is not None else self._elements.new(_shape(arg)[dim], pinned=True))
        out = self._elementwise(node, tensors, skip_dim=dim)
        out[dim] = np.concatenate(parts)
        return out

    # ---- groups ------------------------------------------------------------------------------------------

    def _build_groups(self) -> list[Group]:
        elements = self._elements
        roots = {key: elements.roots(ids) for key, ids in self._param_ids.items()}
        # Units are linked into one group by the dimensions that hold them all (a conv's output channels, a norm,
        # a residual sum's producers); an input dimension only links units no such dimension holds, so that a
        # conv after a concatenation is a member of each concatenated group, at shifted indices.
        links: dict[int, int] = {}

        def find(a: int) -> int:
            links.setdefault(a, a)
            while links[a] != a:
                links[a] = links[links[a]]
                a = links[a]
            return a

        def join(rs: list[int]) -> None:
            if rs:
                a = find(rs[0])
                for r in rs[1:]:
                    b = find(r)
                    if a != b:
                        links[b] = a

        produced: set[int] = set()
        for key, rs in roots.items():
            if key not in self._consumers:
                unique = np.unique(rs).tolist()
                join(unique)
                produced.update(unique)
        for key in self._consumers:
            join([r for r in np.unique(roots[key]).tolist() if r not in produced])
        keys = sorted(roots, key=lambda key: int(self._param_ids[key].min()))
        group_of: dict[int, int] = {}  # unit root -> group root
        order: dict[int, dict[int, int]] = {}  # group root -> unit root -> position in the group
        for key in keys:
            for r in dict.fromkeys(roots[key].tolist()):
                if r not in group_of:
                    group_of[r] = find(r)
                    units = order.setdefault(group_of[r], {})
                    units[r] = len(units)
        parameters = {n for n, _ in self.model.named_parameters()}
        groups: list[Group] = []
        unit_number: dict[int, int] = {}  # unit root -> global unit number
        for units in order.values():
            start = len(unit_number)
            unit_number.update({r: start + k for r, k in units.items()})
            groups.append(Group(len(groups), np.arange(start, start + len(units)),
                                pinned=np.array([elements.pinned[r] for r in units], dtype=bool)))
        self.unit_count = len(unit_number)
        index = {g: k for k, g in enumerate(order)}
        for key in keys:
            name, dim = key
            unique, inverse = np.unique(roots[key], return_inverse=True)
            owners = np.array([group_of[r] for r in unique.tolist()], dtype=np.int64)[inverse]
            numbers = np.array([unit_number[r] for r in unique.tolist()], dtype=np.int64)[inverse]
            for g in dict.fromkeys(owners.tolist()):
                positions = np.flatnonzero(owners == g)
                group = groups[index[g]]
                group.members.append(Member(name, dim, len(owners), positions, numbers[positions],
                                            name in parameters))
                group.renormalised |= name in self._renormalised
        return groups

    def summary(self) -> list[dict]:
        """One dict per group: its index, number of units (channels), whether it is prunable, its members."""
        return [{"group": g.index, "units": len(g.units), "prunable_units": int((~g.pinned).sum()),
                 "renormalised": g.renormalised, "members": [m.describe() for m in g.members]}
                for g in self.groups]

    def summary_lines(self) -> list[str]:
        """`summary()` as printable lines, one per group."""
        lines = []
        for item in self.summary():
            state = "pinned" if not item["prunable_units"] else f"{item['prunable_units']} prunable"
            lines.append(f"group {item['group']}: {item['units']} units ({state}"
                         f"{', renormalised' if item['renormalised'] else ''}): {', '.join(item['members'])}")
        return lines


def _user_frame(error: BaseException) -> str:
    """' at FILE:LINE in FUNCTION' for the innermost frame of the traceback outside torch: the model's code that
    tracing stopped at."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)
              and f.filename != __file__]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}()" if frames else ""


def _nodes_in(value) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, list | tuple):
        return [n for item in value for n in _nodes_in(item)]
    if isinstance(value, dict):
        return [n for item in value.values() for n in _nodes_in(item)]
    return []


def _has_tensors(node: fx.Node) -> bool:
    return "tensor_meta" in node.meta


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in _nodes_in(list(node.args) + list(node.kwargs.values())) if _shape(a) is not None]
