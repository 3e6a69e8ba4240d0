"""The conversion engine shared by every format: a key table plus per-key transforms, both directions.

A `Rule` ties one parameter of ours (a dotted path in the NNX state) to one key of the other format.
A `{i}` in the other key marks a stacked parameter: layer i of theirs is index i of our leading
'layers' axis. Tensors are read one at a time and put straight onto their target sharding, so peak
host memory is one (stacked) parameter, never the whole model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


# Config fields that describe how a model runs, not which weights it has: taken from the run's config, never compared
# with a checkpoint's.
RUNTIME_FIELDS = frozenset({"dtype", "scan_layers", "remat", "max_seq_len", "trainable", "select_layer",
                            "attention"})


def architecture_mismatches(prefix: str, theirs, ours) -> list[str]:
    """"PREFIXfield: checkpoint X vs config Y" for each architecture field (not in RUNTIME_FIELDS) where a
    checkpoint's config dataclass `theirs` differs from `ours`."""
    return [f"{prefix}{f.name}: checkpoint {getattr(theirs, f.name)!r} vs config {getattr(ours, f.name)!r}"
            for f in dataclasses.fields(ours)
            if f.name not in RUNTIME_FIELDS and getattr(theirs, f.name) != getattr(ours, f.name)]


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str  # dotted path in our state, e.g. "layers.attn.q_proj.kernel"
    theirs: str  # their key; "{i}" marks a per-layer key stacked on our leading axis
    to_ours: Transform = identity
    to_theirs: Transform = identity

    @property
    def stacked(self) -> bool:
        return "{i}" in self.theirs


def flat_variables(state) -> dict[str, nnx.Variable]:
    """Dotted path → Variable for every variable of an NNX state."""
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def load_state(
    abstract_state,
    rules: Iterable[Rule],
    read: Callable[[str], np.ndarray],
    shardings=None,
    dtype=jnp.float32,
):
    """Fill an abstract NNX state (from `nnx.eval_shape`) by the rules; returns a concrete state.

    `read(key)` returns one tensor of theirs. Every parameter must be covered by exactly one rule;
    shapes are checked against the abstract state with a message naming the key.
    """
    flat = flat_variables(abstract_state)
    flat_shardings = flat_variables(shardings) if shardings is not None else {}
    values: dict[str, jax.Array] = {}
    for rule in rules:
        if rule.ours not in flat:
            raise KeyError(f"conversion rule targets {rule.ours!r}, which the model does not have")
        target = flat[rule.ours].get_value()
        if rule.stacked:
            layers = [rule.to_ours(np.asarray(read(rule.theirs.format(i=i)))) for i in range(target.shape[0])]
            array = np.stack(layers)
        else:
            array = rule.to_ours(np.asarray(read(rule.theirs)))
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"{rule.theirs} → {rule.ours}: converted shape {array.shape} != model shape {target.shape}"
            )
        sharding = flat_shardings[rule.ours].get_value() if rule.ours in flat_shardings else None
        values[rule.ours] = jax.device_put(array.astype(dtype), sharding)
        del array
    missing = [k for k, v in flat.items() if isinstance(v, nnx.Param) and k not in values]
    if missing:
        raise KeyError(f"no conversion rule for parameters: {missing}")
    leaves = []
    for path, v in nnx.to_flat_state(abstract_state):
        key = ".".join(map(str, path))
        leaves.append((path, v.replace(values[key]) if key in values else v))
    return nnx.from_flat_state(leaves)


def export_state(state, rules: Iterable[Rule]) -> Iterator[tuple[str, np.ndarray]]:
    """Their (key, tensor) pairs from our state, one tensor at a time (host copy of one parameter)."""
    flat = flat_variables(state)
    for rule in rules:
        value = np.asarray(jax.device_get(flat[rule.ours].get_value()), dtype=np.float32)
        if rule.stacked:
            for i in range(value.shape[0]):
                yield rule.theirs.format(i=i), rule.to_theirs(value[i])
        else:
            yield rule.theirs, rule.to_theirs(value)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsReader:
    """Reads tensors by key, as float32, from a HF directory: model.safetensors or a sharded *.index.json.

    The safetensors header is parsed here and tensors are memory-mapped, so bfloat16 checkpoints (which
    `safetensors.numpy` cannot read) load too, and only the tensor asked for is paged in.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        index_files = [f for f in os.listdir(self.directory) if f.endswith(".safetensors.index.json")]
        if index_files:
            with open(os.path.join(self.directory, index_files[0])) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {self.directory}")
        self._entries: dict[str, tuple[str, int, dict]] = {}
        for name in files:
            path = os.path.join(self.directory, name)
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for key, info in header.items():
                self._entries[key] = (path, 8 + header_len, info)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __call__(self, key: str) -> np.ndarray:
        if key not in self._entries:
            raise KeyError(f"{key!r} not found in the safetensors files of {self.directory}")
        path, data_start, info = self._entries[key]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: unsupported safetensors dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
        return raw.view(dtype).reshape(info["shape"]).astype(np.float32)


def write_safetensors(
    directory: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 4 << 30,
    dtype=np.float32,
) -> None:
    """Write (key, tensor) pairs as HF safetensors shards (plus an index when more than one).

    A shard is written as soon as it is full, so host memory holds at most one shard.
    """
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    total = 0

    def flush():
        name = f"part-{len(written):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        written.append((name, list(shard)))
        shard.clear()

    for key, value in tensors:
        value = np.ascontiguousarray(value, dtype=dtype)
        if shard and sum(v.nbytes for v in shard.values()) + value.nbytes > max_shard_bytes:
            flush()
        shard[key] = value
        total += value.nbytes
    if shard or not written:
        flush()
    if len(written) == 1:
        os.replace(os.path.join(directory, written[0][0]), os.path.join(directory, "model.safetensors"))
        return
    weight_map = {}
    for n, (tmp, keys) in enumerate(written, 1):
        name = f"model-{n:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(directory, tmp), os.path.join(directory, name))
        weight_map.update({k: name for k in keys})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
