"""Ahead-of-time compilation of the real train step for a target topology, and its per-device memory.

`python -m meteor_jax.main --config configs/meteor_7b.py:stage2-keep64 --compile_only --topology v5p-64`

Nothing is allocated: the model, optimizer state and global batch are `jax.ShapeDtypeStruct`s carrying their
shardings on a mesh of the target's devices (built from `config.mesh`, −1 fills), and the step that
`trainer.run` jits (`Run.abstract_training`: the same optimizer, TrainState shardings and donated state) is
lowered and compiled for that target. TPU targets need `libtpu` installed (it compiles for any TPU topology on a machine
without TPUs, through `jax.experimental.topologies`); `cpu:N` compiles for N host devices.

Topology names:
- `v4-N`, `v5p-N`: Cloud TPU names, N = TensorCores (2 per chip), so N/2 chips; each chip is one JAX device
  (megacore) holding the chip's HBM.
- `v5e-N` (= `v5litepod-N`), `v6e-N`: N = chips (one TensorCore each).
- `v4:AxBxC`, `v5p:AxBxC`, `v5e:AxB`, `v6e:AxB`: an explicit chip topology.
- `cpu:N`: N host devices (`jax_num_cpu_devices`, or the first N of those already there).
- `h100xN`, `h200xN`, `gpu:N` (= H100): N GPUs, 8 per host. Compiled without a GPU by the CUDA PJRT plugin
  (`pip install jax-cuda13-plugin==JAX_VERSION jax-cuda13-pjrt==JAX_VERSION`, not a project requirement) from a
  device description (XLA's GpuTargetConfig, below) instead of a local device; `ptxas` must be on the PATH (or
  `pip install nvidia-cuda-nvcc`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from meteor_jax import sharding
from meteor_jax.run import Run
from meteor_jax.train import optim
from meteor_jax.train.state import TrainState

GiB = 1024**3

# Memory of one JAX device. TPU: Cloud TPU's per-chip HBM (v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB; a v4/v5p
# chip is one megacore device), counted here as GiB. GPU: the total CUDA reports (H100 SXM 80 GB: 84,978,434,048
# bytes as in XLA's h100_sxm spec; H200 141 GB: 143,771 MiB as nvidia-smi shows); the CUDA context and XLA's
# allocator reserve take some of it.
HBM_BYTES = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "h100": 84_978_434_048,
    "h200": 143_771 * 2**20,
}

# XLA GPU target descriptions (GpuTargetConfigProto fields) for compiling without the GPU. H100: XLA's
# tools/hlo_opt/gpu_specs/h100_sxm values; H200: the same Hopper die (132 SMs) with 141 GB of HBM3e at 4.8 TB/s.
_H100 = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
             shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
             block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535,
             memory_bandwidth=3_352_320_000_000, l2_cache_size=52428800, clock_rate_ghz=1.98,
             device_memory_size=HBM_BYTES["h100"], shared_memory_per_block_optin=232448,
             registers_per_core_limit=65536, registers_per_block_limit=65536)
GPU_SPECS = {
    "h100": ("NVIDIA H100 80GB HBM3", _H100),
    "h200": ("NVIDIA H200", dict(_H100, memory_bandwidth=4_800_000_000_000, device_memory_size=HBM_BYTES["h200"])),
}
GPUS_PER_HOST = 8


def gpu_target_config(generation: str) -> str:
    """The text GpuTargetConfigProto of a GPU generation (compute capability 9.0, CUDA)."""
    name, info = GPU_SPECS[generation]
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
            f'platform_name: "CUDA"\ndevice_description_str: "{name}"\n')

_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}
_TPU_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}  # torus rank of the chip topology
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # what the N of `vX-N` counts


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: what `--topology` names."""

    name: str  # as given
    platform: str  # "tpu" | "cpu" | "gpu"
    generation: str  # "v5p", "v5e", ..., "cpu", "h100"
    num_devices: int  # JAX devices (TPU chips)
    hbm_bytes: int | None  # per device; None where unknown (cpu)
    topology: str | None = None  # libtpu's topology name, e.g. "v5p:2x4x4"
    chip_config: str | None = None  # "megacore" (v4, v5p) or "default"


def _chip_shape(chips: int, rank: int) -> tuple[int, ...]:
    """The usual slice shape of `chips` chips: 2x2(x1) for 4, then doubling the last of the smallest sides
    (v5p/v4: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; v5e/v6e: 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16)."""
    if chips == 1:
        return (1,) * rank
    if chips < 4 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: give the topology explicitly (e.g. v5p:4x4x12), only 1 or 4·2^k chips "
                         "have a default shape")
    dims = [2, 2] + [1] * (rank - 2)
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return tuple(dims)


def parse_topology(name: str) -> Target:
    """`--topology` → Target (see the module docstring for the names)."""
    text = name.strip().lower()
    m = re.fullmatch(r"cpu(?::(\d+))?", text)
    if m:
        return Target(name, "cpu", "cpu", int(m.group(1) or 1), None)
    m = re.fullmatch(r"(?:(h100|h200)x(\d+)|gpu:(\d+))", text)
    if m:
        gen, count = m.group(1) or "h100", int(m.group(2) or m.group(3))
        if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
            raise ValueError(f"--topology={name!r}: GPU counts above {GPUS_PER_HOST} are whole hosts of "
                             f"{GPUS_PER_HOST} GPUs")
        hosts, per_host = (1, count) if count <= GPUS_PER_HOST else (count // GPUS_PER_HOST, GPUS_PER_HOST)
        return Target(name, "gpu", gen, count, HBM_BYTES[gen], f"1x{hosts}x{per_host}")
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v5lite|v6e|v5)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text)
    if not m:
        raise ValueError(f"--topology={name!r}: expected v4-N, v5p-N (N TensorCores), v5e-N/v5litepod-N, v6e-N "
                         "(N chips), an explicit v5p:2x4x4-style chip topology, cpu:N, or h100xN/gpu:N")
    gen = _TPU_ALIASES.get(m.group(1), m.group(1))
    rank = _TPU_DIMS[gen]
    if m.group(2):
        count = int(m.group(2))
        per_chip = _CORES_PER_CHIP[gen]
        if count < 1 or count % per_chip:
            raise ValueError(f"--topology={name!r}: {gen}-N counts TensorCores ({per_chip} per chip), so N must be a "
                             f"positive multiple of {per_chip}")
        dims = _chip_shape(count // per_chip, rank)
    else:
        dims = tuple(int(d) for d in m.group(3).split("x"))
        if len(dims) != rank or min(dims) < 1:
            raise ValueError(f"--topology={name!r}: a {gen} topology has {rank} positive sides")
    chip_config = "megacore" if _CORES_PER_CHIP[gen] == 2 else "default"
    return Target(name, "tpu", gen, math.prod(dims), HBM_BYTES[gen], f"{gen}:{'x'.join(map(str, dims))}",
                  chip_config)


def target_devices(target: Target) -> list:
    """The target's devices: compile-only TPU (libtpu) or GPU (CUDA plugin) devices, or host CPU devices."""
    if target.platform == "tpu":
        from jax.experimental import topologies

        # Compiling touches no TPU: several processes may load libtpu at once (it takes a lock file otherwise).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

        kwargs = dict(chip_config_name=target.chip_config)
        dims = [int(d) for d in target.topology.split(":")[1].split("x")]
        if dims[0] < 2 or dims[1] < 2:  # libtpu's default host is 2x2x1 chips: a smaller slice is one host
            kwargs["chips_per_host_bounds"] = [min(dims[0], 2), min(dims[1], 2), 1]
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs)
        except Exception as e:  # no libtpu, or a topology libtpu rejects
            raise RuntimeError(f"could not describe TPU topology {target.topology} ({target.name}): "
                               f"{type(e).__name__}: {e} (TPU targets need libtpu: pip install "
                               f"'jax[tpu]=={jax.__version__}')") from e
        devices = list(desc.devices)
        if len(devices) != target.num_devices:
            raise RuntimeError(f"{target.topology}: libtpu gave {len(devices)} devices, expected {target.num_devices}")
        return devices
    if target.platform == "cpu":
        _ensure_cpu_devices(target.num_devices)
        devices = jax.devices("cpu")
        if len(devices) < target.num_devices:
            raise RuntimeError(f"--topology={target.name}: the CPU backend is already running with {len(devices)} "
                               f"devices; start the process with XLA_FLAGS=--xla_force_host_platform_device_count="
                               f"{target.num_devices}")
        return devices[:target.num_devices]
    from jax.experimental import topologies

    try:  # slices x hosts per slice x GPUs per host, described by the target config, no local GPU needed
        desc = topologies.get_topology_desc(platform="cuda", topology_name="cuda", topology=target.topology,
                                            target_config=gpu_target_config(target.generation))
    except Exception as e:
        raise RuntimeError(
            f"could not describe {target.num_devices} {target.generation.upper()} GPUs ({target.name}): "
            f"{type(e).__name__}: {e}. Compiling for a GPU without one needs the CUDA PJRT plugin: pip install "
            f"jax-cuda13-plugin=={jax.__version__} jax-cuda13-pjrt=={jax.__version__} (and ptxas, e.g. from "
            "nvidia-cuda-nvcc)") from e
    return list(desc.devices)


def _ensure_cpu_devices(count: int) -> None:
    """Ask for `count` host devices if the CPU backend has not started yet (otherwise a no-op)."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    if jax.config.jax_num_cpu_devices < count:
        jax.config.update("jax_num_cpu_devices", count)


# ----------------------------------------------------------------------------------------------- abstract inputs


def abstract_batch(run: Run) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of one train step (what `sharding.global_batch` gives the step), as sharded structs.

    Shapes and dtypes are those of `data.features.make_features` stacked by the pipeline (see the batch layout in
    `models/meteor.py`); the leading dimension is config.train.batch_size over the 'batch' rule's mesh axes."""
    config, mesh, rules = run.config, run.mesh, run.rules
    b, t, m = config.train.batch_size, config.data.max_len, config.data.instruction_len
    s = run.model_cfg.vision.image_size
    shapes = dict(
        pixels=((b, s, s, 3), jnp.float32),
        tokens=((b, t), jnp.int32),
        mask=((b, t), jnp.bool_),
        image_mask=((b, t), jnp.bool_),
        instruction=((b, m), jnp.int32),
        instruction_mask=((b, m), jnp.bool_),
        labels=((b, t), jnp.int32),
    )
    out = {}
    for key, (shape, dtype) in shapes.items():
        spec = sharding.batch_sharding(mesh, len(shape), rules)
        ways = _shard_count(spec, 0)
        if shape[0] % ways:
            raise ValueError(f"config.train.batch_size={b} is not divisible by the {ways} devices the batch is "
                             f"split over (mesh {dict(mesh.shape)})")
        out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=spec)
    return out


def _shard_count(spec: NamedSharding, dim: int) -> int:
    entry = spec.spec[dim] if dim < len(spec.spec) else None
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(spec.mesh.shape[a] for a in axes)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays): the largest shard of each leaf."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class Compiled:
    """What `compile_train_step` built: the compiled step and its abstract inputs."""

    compiled: Any  # jax.stages.Compiled
    state: TrainState  # of sharded ShapeDtypeStructs
    batch: dict
    labels: Any
    mesh: jax.sharding.Mesh
    target: Target
    compile_seconds: float


def compile_train_step(config, target: Target | str, *, num_steps: int | None = None) -> Compiled:
    """Lower and compile the train step of `trainer.run` for `target`, from abstract state and batch only.

    `num_steps` only sets the learning-rate schedule's length (a compiled-in constant; config.train.num_steps
    or 1000 when the run's length would come from the dataset)."""
    if isinstance(target, str):
        target = parse_topology(target)
    run = Run.from_config(config, devices=target_devices(target))
    training = run.abstract_training(num_steps or run.config.train.num_steps or 1000)
    batch = abstract_batch(run)
    options = {}
    if target.platform == "gpu":
        # Without a device XLA cannot autotune, and its Triton GEMM fusions then fail on small dots ("Couldn't find
        # output tile sizes that satisfy hlo"): compile dots as cuBLAS calls instead (same buffers, near enough).
        options["xla_gpu_enable_triton_gemm"] = False
    t0 = time.perf_counter()
    compiled = training.step.lower(training.state, batch).compile(compiler_options=options or None)
    return Compiled(compiled, training.state, batch, training.optimizer.labels, run.mesh, target,
                    time.perf_counter() - t0)


def memory_report(result: Compiled, hbm_bytes: int | None = None) -> dict:
    """Per-device memory of a compiled step: XLA's memory analysis, the state's share of it computed from the
    abstract arrays and their shardings, and whether it fits in `hbm_bytes` (default: the target's)."""
    c = result.compiled
    stats = c.memory_analysis()
    analysis = dict(
        argument=int(stats.argument_size_in_bytes),
        output=int(stats.output_size_in_bytes),
        alias=int(stats.alias_size_in_bytes),
        temp=int(stats.temp_size_in_bytes),
        generated_code=int(stats.generated_code_size_in_bytes),
    )
    peak = getattr(stats, "peak_memory_in_bytes", None)
    if peak:
        analysis["peak"] = int(peak)
    # Live at once: inputs, outputs not written in place of a donated input, temporaries, the program itself.
    total = analysis["argument"] + analysis["output"] - analysis["alias"] + analysis["temp"] + analysis["generated_code"]
    state = result.state
    params = bytes_per_device(state.params)
    opt_state = bytes_per_device(state.opt_state)
    scalars = bytes_per_device((state.step, state.skipped))
    batch = bytes_per_device(result.batch)
    hbm = result.target.hbm_bytes if hbm_bytes is None else hbm_bytes
    trained = sum(math.prod(p.shape) for p, label in zip(jax.tree.leaves(state.params), jax.tree.leaves(result.labels))
                  if label == optim.TRAINED)
    return dict(
        target=result.target.name,
        platform=result.target.platform,
        topology=result.target.topology,
        device_kind=result.mesh.devices.flat[0].device_kind,
        num_devices=int(result.mesh.size),
        mesh={k: int(v) for k, v in result.mesh.shape.items()},
        parameters=sum(math.prod(p.shape) for p in jax.tree.leaves(state.params)),
        trained_parameters=trained,
        global_batch=int(result.batch["tokens"].shape[0]),
        seq_len=int(result.batch["tokens"].shape[1]),
        compile_seconds=round(result.compile_seconds, 1),
        memory_analysis=analysis,
        per_device=dict(
            params=params,
            opt_state=opt_state,
            batch=batch,
            # Whatever XLA holds besides the train state and the batch: activations kept for the backward pass,
            # gradients, temporaries, the non-aliased outputs (metrics), the program.
            activations_and_temporaries=total - params - opt_state - scalars - batch,
            total=total,
        ),
        state_total=dict(params=total_bytes(state.params), opt_state=total_bytes(state.opt_state)),
        hbm_per_device=hbm,
        fits=None if hbm is None else total <= hbm,
    )


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:8.2f} GiB" if abs(n) >= GiB // 10 else f"{n / 2**20:8.2f} MiB"


def format_report(report: dict) -> str:
    a, d = report["memory_analysis"], report["per_device"]
    fits = {None: "unknown (no device memory size for this target)", True: "yes", False: "NO"}[report["fits"]]
    lines = [
        f"target {report['target']} ({report['device_kind']}, {report['num_devices']} devices"
        + (f", topology {report['topology']}" if report["topology"] else "") + f"), mesh {report['mesh']}",
        f"parameters {report['parameters']:,} ({report['trained_parameters']:,} trained), global batch "
        f"{report['global_batch']} x {report['seq_len']} tokens, compiled in {report['compile_seconds']} s",
        "per device (XLA memory analysis):",
        f"  arguments            {_gib(a['argument'])}",
        f"  outputs              {_gib(a['output'])}",
        f"  aliased (donated)    {_gib(a['alias'])}",
        f"  temporaries          {_gib(a['temp'])}",
        f"  generated code       {_gib(a['generated_code'])}",
    ]
    if "peak" in a:
        lines.append(f"  peak (XLA)           {_gib(a['peak'])}")
    lines += [
        "per device, split:",
        f"  parameters           {_gib(d['params'])}",
        f"  optimizer state      {_gib(d['opt_state'])}",
        f"  batch                {_gib(d['batch'])}",
        f"  activations + temps  {_gib(d['activations_and_temporaries'])}",
        f"  total                {_gib(d['total'])}",
        f"device memory          {_gib(report['hbm_per_device'])}",
        f"fits                   {fits}",
    ]
    return "\n".join(lines)


def run(config, topology: str) -> dict:
    """`--compile_only`: compile for `topology`, print the memory table, return the report."""
    result = compile_train_step(config, topology)
    report = memory_report(result)
    print(format_report(report), flush=True)
    return report
