"""A Core ML ML program executed op by op in PyTorch, where Core ML itself is absent (build side).

The package's MIL program is read with coremltools' own loader (which works
off macOS): its graph and every weight as stored in ``weights/weight.bin``,
the int8 ones through their ``constexpr_affine_dequantize`` ops. Each op then
runs as the MIL specification defines it, in the dtype the program gives it
(an fp16 program computes in float16). So what the proxy evaluates is the
built package, not a reproduction of it: a weight that differs in the package
changes the answers.

What only Core ML can tell: its own fusions and the CPU, GPU and Neural Engine
kernels (the Neural Engine accumulates in fp16).

Only the ops the project's families and usual user models convert to are
known (`_ops`); a program with any other op raises `UnsupportedProgram`, and
the proxy then says it is unverified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np


class UnsupportedProgram(Exception):
    """The program holds an op (or an op's option) this interpreter does not execute."""


_DTYPES = {"fp16": "float16", "fp32": "float32", "int32": "int32", "int16": "int16", "int8": "int8",
           "uint8": "uint8", "bool": "bool"}


def _torch() -> Any:
    import torch

    return torch


def _t(v: Any, like: Any = None) -> Any:
    """A tensor of ``v`` (a const's numpy value or a tensor); floats take ``like``'s float dtype when given."""
    torch = _torch()
    if not isinstance(v, torch.Tensor):
        v = torch.from_numpy(np.array(v))
    if like is not None and v.is_floating_point() and like.is_floating_point() and v.dtype != like.dtype:
        v = v.to(like.dtype)
    return v


def _ints(v: Any) -> list[int]:
    return [int(i) for i in np.asarray(v.tolist() if hasattr(v, "tolist") else v).reshape(-1)]


def _pads(x: Any, pad_type: str, pad: Any, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """MIL's padding as begin/end per spatial dim (first dim first)."""
    n = len(kernel)
    if pad_type == "valid":
        return [0] * (2 * n)
    if pad_type == "custom":
        return _ints(pad)
    if pad_type in ("same", "same_lower"):
        out: list[int] = []
        for i in range(n):
            size = int(x.shape[2 + i])
            eff = (kernel[i] - 1) * dilations[i] + 1
            total = max((-(-size // strides[i]) - 1) * strides[i] + eff - size, 0)
            lo = total // 2 if pad_type == "same" else total - total // 2
            out += [lo, total - lo]
        return out
    raise UnsupportedProgram(f"pad_type {pad_type!r}")


def _torch_pad(pads: list[int]) -> list[int]:
    """begin/end per dim, first dim first -> torch.nn.functional.pad's order (last dim first)."""
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]
    return [p for pair in reversed(pairs) for p in pair]


def _conv(x: Any, weight: Any, bias: Any = None, strides: Any = None, pad_type: str = "valid", pad: Any = None,
          dilations: Any = None, groups: Any = 1) -> Any:
    F = _torch().nn.functional
    w = _t(weight, x)
    n = w.dim() - 2
    strides = _ints(strides) if strides is not None else [1] * n
    dilations = _ints(dilations) if dilations is not None else [1] * n
    pads = _pads(x, pad_type, pad, list(w.shape[2:]), strides, dilations)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(n)
    if fn is None:
        raise UnsupportedProgram(f"conv over {n} spatial dims")
    if any(pads):
        x = F.pad(x, _torch_pad(pads))
    return fn(x, w, None if bias is None else _t(bias, x), stride=strides, dilation=dilations, groups=int(groups))


def _pool(kind: str) -> Callable[..., Any]:
    def pool(x: Any, kernel_sizes: Any, strides: Any = None, pad_type: str = "valid", pad: Any = None,
             exclude_padding_from_average: Any = False, ceil_mode: Any = False) -> Any:
        F = _torch().nn.functional
        k = _ints(kernel_sizes)
        s = _ints(strides) if strides is not None else [1] * len(k)
        pads = _pads(x, pad_type, pad, k, s, [1] * len(k))
        if len(k) != 2 or bool(ceil_mode):
            raise UnsupportedProgram(f"{kind}_pool over {len(k)} dims, ceil_mode {bool(ceil_mode)}")
        if kind == "max":
            if any(pads):
                x = F.pad(x, _torch_pad(pads), value=float("-inf"))
            return F.max_pool2d(x, k, s)
        ones = _torch().ones_like(x[:1, :1])
        if any(pads):
            x, ones = F.pad(x, _torch_pad(pads)), F.pad(ones, _torch_pad(pads))
        total = F.avg_pool2d(x, k, s) * (k[0] * k[1])
        if bool(exclude_padding_from_average):
            return total / (F.avg_pool2d(ones, k, s) * (k[0] * k[1]))
        return total / (k[0] * k[1])

    return pool


def _reduce(fn: str) -> Callable[..., Any]:
    def reduce(x: Any, axes: Any = None, keep_dims: Any = False) -> Any:
        torch = _torch()
        dims = _ints(axes) if axes is not None else list(range(x.dim()))
        if fn == "max":
            return torch.amax(x, dim=dims, keepdim=bool(keep_dims))
        return getattr(torch, fn)(x, dim=dims, keepdim=bool(keep_dims))

    return reduce


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def binary(x: Any, y: Any) -> Any:
        torch = _torch()
        a = x if isinstance(x, torch.Tensor) else None
        b = y if isinstance(y, torch.Tensor) else None
        like = a if a is not None else b
        return fn(_t(x, like), _t(y, like))

    return binary


def _unary(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    return lambda x: fn(x)


def _reshape(x: Any, shape: Any) -> Any:
    dims = _ints(shape)
    if len(dims) == x.dim():
        dims = [int(x.shape[i]) if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _squeeze(x: Any, axes: Any = None) -> Any:
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in _ints(axes)), reverse=True):
        x = x.squeeze(a)
    return x


def _expand_dims(x: Any, axes: Any) -> Any:
    rank = x.dim() + len(_ints(axes))
    for a in sorted(a % rank for a in _ints(axes)):
        x = x.unsqueeze(a)
    return x


def _slice_by_index(x: Any, begin: Any, end: Any, stride: Any = None, begin_mask: Any = None, end_mask: Any = None,
                    squeeze_mask: Any = None) -> Any:
    n = x.dim()
    b, e = _ints(begin), _ints(end)
    s = _ints(stride) if stride is not None else [1] * n
    bm = [bool(v) for v in np.asarray(begin_mask).reshape(-1)] if begin_mask is not None else [False] * n
    em = [bool(v) for v in np.asarray(end_mask).reshape(-1)] if end_mask is not None else [False] * n
    sq = [bool(v) for v in np.asarray(squeeze_mask).reshape(-1)] if squeeze_mask is not None else [False] * n
    if any(v < 0 for v in s):
        raise UnsupportedProgram("slice_by_index with a negative stride")
    index: list[int | slice] = []
    for i in range(n):
        if sq[i]:
            index.append(b[i])
        else:
            index.append(slice(None if bm[i] else b[i], None if em[i] else e[i], s[i]))
    return x[tuple(index)]


def _concat(values: Any, axis: Any, interleave: Any = False) -> Any:
    torch = _torch()
    if bool(interleave):
        raise UnsupportedProgram("concat with interleave")
    ts = [v for v in values if isinstance(v, torch.Tensor)]
    like = ts[0] if ts else None
    return torch.cat([_t(v, like) for v in values], dim=int(axis))


def _cast(x: Any, dtype: str) -> Any:
    torch = _torch()
    name = _DTYPES.get(str(dtype))
    if name is None:
        raise UnsupportedProgram(f"cast to {dtype}")
    return _t(x).to(getattr(torch, name))


def _dequantize(quantized_data: Any, zero_point: Any, scale: Any, axis: Any) -> Any:
    """constexpr_affine_dequantize: (quantized - zero point) * scale along ``axis``, in the scale's dtype."""
    q, zp, sc = np.asarray(quantized_data), np.asarray(zero_point), np.asarray(scale)
    shape = [1] * q.ndim
    if zp.ndim or sc.ndim:
        shape[int(axis)] = -1
    w = (q.astype(np.float32) - np.reshape(zp, shape).astype(np.float32)) * np.reshape(sc, shape)
    return _torch().from_numpy(np.ascontiguousarray(w.astype(sc.dtype)))


def _batch_norm(x: Any, mean: Any, variance: Any, gamma: Any = None, beta: Any = None, epsilon: Any = 1e-5) -> Any:
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - _t(mean, x).reshape(shape)) / (_t(variance, x).reshape(shape) + float(epsilon)).sqrt()
    if gamma is not None:
        y = y * _t(gamma, x).reshape(shape)
    return y if beta is None else y + _t(beta, x).reshape(shape)


def _layer_norm(x: Any, axes: Any = None, gamma: Any = None, beta: Any = None, epsilon: Any = 1e-5) -> Any:
    dims = _ints(axes) if axes is not None else list(range(x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / (var + float(epsilon)).sqrt()
    if gamma is not None:
        y = y * _t(gamma, x)
    return y if beta is None else y + _t(beta, x)


def _gelu(x: Any, mode: str = "EXACT") -> Any:
    torch = _torch()
    if mode == "EXACT":
        return torch.nn.functional.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise UnsupportedProgram(f"gelu mode {mode!r}")


def _matmul(x: Any, y: Any, transpose_x: Any = False, transpose_y: Any = False) -> Any:
    torch = _torch()
    like = x if isinstance(x, torch.Tensor) else y
    a, b = _t(x, like), _t(y, like)
    if bool(transpose_x):
        a = a.transpose(-1, -2)
    if bool(transpose_y):
        b = b.transpose(-1, -2)
    return torch.matmul(a, b)


def _pad(x: Any, pad: Any, mode: str = "constant", constant_val: Any = 0.0) -> Any:
    F = _torch().nn.functional
    pads = _ints(pad)
    if mode == "constant":
        return F.pad(x, _torch_pad(pads), value=float(constant_val))
    if mode in ("reflect", "replicate"):
        return F.pad(x, _torch_pad(pads), mode=mode)
    raise UnsupportedProgram(f"pad mode {mode!r}")


def _split(x: Any, num_splits: Any = None, split_sizes: Any = None, axis: Any = 0) -> tuple[Any, ...]:
    ax = int(axis)
    if split_sizes is not None:
        return tuple(x.split(_ints(split_sizes), dim=ax))
    return tuple(x.chunk(int(num_splits), dim=ax))


def _ops() -> dict[str, Callable[..., Any]]:
    torch = _torch()
    F = torch.nn.functional
    return {
        "cast": _cast,
        "constexpr_affine_dequantize": _dequantize,
        "conv": _conv,
        "linear": lambda x, weight, bias=None: F.linear(x, _t(weight, x), None if bias is None else _t(bias, x)),
        "matmul": _matmul,
        "batch_norm": _batch_norm,
        "layer_norm": _layer_norm,
        "relu": _unary(F.relu),
        "relu6": lambda x: torch.clamp(x, 0, 6),
        "sigmoid": _unary(torch.sigmoid),
        "tanh": _unary(torch.tanh),
        "silu": _unary(F.silu),
        "gelu": _gelu,
        "softmax": lambda x, axis=-1: torch.softmax(x, dim=int(axis)),
        "leaky_relu": lambda x, alpha=0.01: F.leaky_relu(x, float(alpha)),
        "clip": lambda x, alpha, beta: torch.clamp(x, float(alpha), float(beta)),
        "sigmoid_hard": lambda x, alpha=0.2, beta=0.5: torch.clamp(float(alpha) * x + float(beta), 0, 1),
        "add": _binary(torch.add),
        "sub": _binary(torch.sub),
        "mul": _binary(torch.mul),
        "real_div": _binary(torch.div),
        "maximum": _binary(torch.maximum),
        "minimum": _binary(torch.minimum),
        "pow": _binary(torch.pow),
        "sqrt": _unary(torch.sqrt),
        "rsqrt": lambda x, epsilon=1e-12: torch.rsqrt(x + float(epsilon)),
        "exp": _unary(torch.exp),
        "abs": _unary(torch.abs),
        "erf": _unary(torch.erf),
        "square": _unary(torch.square),
        "inverse": lambda x, epsilon=1e-4: 1.0 / (x + float(epsilon)),
        "reduce_mean": _reduce("mean"),
        "reduce_sum": _reduce("sum"),
        "reduce_max": _reduce("max"),
        "avg_pool": _pool("avg"),
        "max_pool": _pool("max"),
        "reshape": _reshape,
        "expand_dims": _expand_dims,
        "squeeze": _squeeze,
        "transpose": lambda x, perm: x.permute(_ints(perm)),
        "flatten2d": lambda x, axis=1: x.reshape(int(np.prod(x.shape[:int(axis)])), -1),
        "concat": _concat,
        "split": _split,
        "slice_by_index": _slice_by_index,
        "shape": lambda x: torch.tensor(list(x.shape), dtype=torch.int32),
        "gather": lambda x, indices, axis=0, batch_dims=0: torch.index_select(
            _t(x), int(axis), _t(indices).reshape(-1).long()).reshape(
            *_t(x).shape[:int(axis)], *np.shape(indices), *_t(x).shape[int(axis) + 1:]),
        "identity": lambda x: x,
        "pad": _pad,
    }


def load_program(package: Path) -> Any:
    """The package's MIL program, weights included, read with coremltools' loader."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    m = ct.models.MLModel(str(package), skip_model_load=True)
    spec = m.get_spec()
    return load_mil(spec, spec.specificationVersion, m.weights_dir)


class MilProgramRunner:
    """``run(batch) -> logits``: the package's ``main`` function, op by op; raises `UnsupportedProgram` at load
    for an op it does not know."""

    def __init__(self, package: Path) -> None:
        prog = load_program(package)
        self.function = prog.functions["main"]
        self.input_name, var = next(iter(self.function.inputs.items()))
        tail = tuple(var.shape[1:])
        if not all(isinstance(d, (int, np.integer)) for d in tail):
            raise UnsupportedProgram(f"input {self.input_name} has a sample shape that is not fixed: {var.shape}")
        self.sample_shape = tuple(int(d) for d in tail)
        self.ops = [op for op in self.function.operations if op.op_type != "const"]
        self._impl = _ops()
        unknown = sorted({op.op_type for op in self.ops} - set(self._impl))
        if unknown:
            raise UnsupportedProgram(f"ops this interpreter does not execute: {', '.join(unknown)}")
        self.compute_dtypes = sorted({str(v.dtype.__name__) for op in self.ops for v in op.outputs
                                      if v.dtype.__name__ in ("fp16", "fp32")})

    def weights(self) -> list[tuple[str, np.ndarray]]:
        """Every float tensor the program stores with two or more elements (dequantized), by the op reading it."""
        out: list[tuple[str, np.ndarray]] = []
        env: dict[Any, Any] = {}  # by value name; unnamed (inline) values look up None and miss
        for op in self.function.operations:
            if op.op_type == "constexpr_affine_dequantize":
                env[op.outputs[0].name] = self._call(op, env).numpy()
        for op in self.ops:
            if op.op_type.startswith("constexpr_"):
                continue
            for k, v in op.inputs.items():
                val = env.get(getattr(v, "name", None))
                if val is None and not isinstance(v, (list, tuple)) and v.val is not None:
                    val = v.val
                if isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.size > 1:
                    out.append((f"{op.op_type} {op.name}.{k}", val))
        return out

    def _value(self, v: Any, env: dict[str, Any]) -> Any:
        if isinstance(v, (list, tuple)):
            return [self._value(x, env) for x in v]
        if v.name in env:
            return env[v.name]
        if v.val is not None:
            return v.val
        raise UnsupportedProgram(f"value {v.name} is neither computed nor constant")

    def _call(self, op: Any, env: dict[str, Any]) -> Any:
        args = {k: self._value(v, env) for k, v in op.inputs.items()}
        try:
            return self._impl[op.op_type](**args)
        except UnsupportedProgram as e:
            raise UnsupportedProgram(f"{op.op_type} {op.name}: {e}") from e
        except TypeError as e:  # an input this interpreter does not know
            raise UnsupportedProgram(f"{op.op_type} {op.name}: {e}") from e

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = _torch()
        env: dict[str, Any] = {self.input_name: torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))}
        with torch.no_grad():
            for op in self.ops:
                out = self._call(op, env)
                outs = out if isinstance(out, tuple) else (out,)
                for var, val in zip(op.outputs, outs):
                    env[var.name] = val
            y = env[self.function.outputs[0].name]
        return _t(y).float().numpy()
