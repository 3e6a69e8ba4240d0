"""The multi-controller runtime: one Python process per host, all running the same program.

`initialize(...)` must run before any other JAX call. With explicit arguments (`--coordinator_address`,
`--num_processes`, `--process_id`) it starts `jax.distributed` with them; without, it starts it only where a cluster
is detected (a Cloud TPU VM, a SLURM job step with more than one task, Open MPI's `mpirun`, or the
`JAX_COORDINATOR_ADDRESS` environment variable), so a plain single-process run never waits for peers.

On CPU, cross-process computations need a collectives implementation: gloo is enabled when several processes run.

The rest is what a multi-process run needs besides: barriers, small JSON all-gathers, which rows of the global
batch each process feeds (`process_rows`), and the data-iterator state of the whole run in a checkpoint, movable
to another number of processes (`run_data_state`, `process_data_state`).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from meteor_jax import sharding


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _tpu_chips() -> int:
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except Exception:  # noqa: BLE001 (a private helper: its absence just means "no TPU detected")
        return 0


def detect_cluster() -> str | None:
    """The name of the multi-process environment this process runs in, or None for a single process."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if (_int_env("SLURM_NTASKS") or 1) > 1 and all(
            v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")):
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if _tpu_chips() > 0:
        return "tpu"
    return None


def _enable_cpu_collectives() -> None:
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # an older JAX without the option
        pass


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> tuple[int, int]:
    """Start the distributed runtime if this is a multi-process run; returns (process_index, process_count).

    coordinator_address: "host:port" of process 0 (every process passes the same one).
    num_processes / process_id: the number of processes and this one's index in [0, num_processes).
    local_device_count: CPU only: the number of CPU devices this process provides (testing on one machine).
    Giving any of the first three requires all three (unless the rest are detected from a cluster environment).
    """
    if local_device_count is not None:
        if local_device_count < 1:
            raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")
        jax.config.update("jax_num_cpu_devices", local_device_count)
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if num_processes is not None and num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
        if num_processes == 1 and coordinator_address is None:
            return 0, 1  # explicitly a single process: nothing to start
        _enable_cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        cluster = detect_cluster()
        if cluster is None:
            return 0, 1
        _enable_cpu_collectives()
        try:
            jax.distributed.initialize()
        except Exception as e:
            # A single-host TPU VM without its metadata server (e.g. a local TPU) runs fine as one process; a
            # multi-worker slice must not silently train as independent copies.
            hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
            if cluster != "tpu" or "," in hosts:
                raise
            logging.warning("jax.distributed.initialize() on a TPU VM failed (%s); running as a single process", e)
            return 0, 1
    logging.info("distributed runtime: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_index(), jax.process_count()


def process_rows(mesh, rules, batch_size: int) -> tuple[int, int, int]:
    """(slot, slots, rows): this process feeds `rows` rows of every global batch of slots·rows = batch_size, the
    slot-th block of them in the data order. When every process's devices hold one block of consecutive rows (the
    usual mesh), slot·rows is that block's first row, so the global batches are exactly those of one process with
    the whole batch; otherwise they hold the same samples in another order. Processes whose devices hold the same
    rows (batch axes that do not span the processes) share a slot and feed the same data. A collective."""
    shard = sharding.batch_sharding(mesh, 1, rules)
    starts = sorted({i[0].start or 0 for i in shard.addressable_devices_indices_map((batch_size,)).values()})
    rows = len(starts) * shard.shard_shape((batch_size,))[0]
    groups = sorted({tuple(g) for g in allgather_json(starts)})
    if rows * len(groups) != batch_size:
        raise ValueError(f"the processes hold rows starting at {groups} of the global batch {batch_size}: not "
                         f"{len(groups)} disjoint sets of {rows} rows")
    return groups.index(tuple(starts)), len(groups), rows


def sync(name: str) -> None:
    """A barrier over all processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_0_first(fn):
    """fn() on process 0, then on the others: e.g. a dataset built on first use, built once without racing."""
    if jax.process_index() == 0:
        out = fn()
    sync("process 0 first")
    if jax.process_index() != 0:
        out = fn()
    return out


def allgather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...] for a JSON-able obj (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(max(256, 1 << int(sizes.max() - 1).bit_length()), np.uint8)  # few shapes: few compiles
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)])) for row, n in zip(rows, sizes)]


def _sum_counts(states) -> dict:
    total = {"kept": 0, "truncated": 0, "skipped": {}}
    for s in states:
        total["kept"] += int(s["kept"])
        total["truncated"] += int(s["truncated"])
        for reason, n in s["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + int(n)
    return total


def run_skip_counts(counts: dict, slot: int) -> dict:
    """The samples kept/skipped/truncated by the whole run (each slot counted once; `counts` is this process's
    `pipeline.SkipCounter.get_state()`), the same on every process. A collective."""
    if jax.process_count() == 1:
        return counts
    by_slot = {g["slot"]: g["counts"] for g in allgather_json({"slot": slot, "counts": counts})}
    return _sum_counts(by_slot.values())


def run_data_state(local_state, slot: int, slots: int, rows: int) -> dict:
    """The data state of the whole run, for a checkpoint: every slot's iterator state, gathered from the
    processes (a collective)."""
    by_slot = {g["slot"]: g["state"] for g in allgather_json({"slot": slot, "state": local_state})}
    return {"rows": rows, "slots": [by_slot[i] for i in range(slots)]}


def process_data_state(saved, slot: int, slots: int, rows: int, batch_size: int):
    """This process's iterator state from a checkpoint's run data state. When the number of processes or the rows
    per process changed, every process goes on from where the saved run's furthest slot had got to in the shared
    record order: the same records as an uninterrupted run when no sample was skipped."""
    if saved is None:
        return None
    if not (isinstance(saved, dict) and "slots" in saved):  # a single iterator's state (older checkpoints)
        saved = {"rows": batch_size, "slots": [saved]}
    old_rows, states = int(saved["rows"]), saved["slots"]
    if len(states) == slots and old_rows == rows:
        return states[slot]
    try:
        positions = [int(s["parent"]["next_index"]) for s in states]
        counts = [s["counts"] for s in states]
    except (KeyError, TypeError) as e:
        raise ValueError(f"the data iterator state was saved by {len(states)} process(es) × {old_rows} rows; it "
                         f"cannot be moved to {slots} × {rows} rows (only config.data.worker_count=0 states can): "
                         "resume with the same processes and batch size") from e
    consumed = max(-(-k // old_rows) for k in positions) * old_rows * len(states)
    if len(set(positions)) > 1 or positions[0] % old_rows:
        logging.warning("data state of %d × %d rows at positions %s moved to %d × %d rows: records up to %d of the "
                        "shared order count as read", len(states), old_rows, positions, slots, rows, consumed)
    full, rest = divmod(consumed, rows * slots)
    empty = {"kept": 0, "truncated": 0, "skipped": {}}
    return {"parent": {"next_index": full * rows + min(max(rest - slot * rows, 0), rows)},
            "counts": _sum_counts(counts) if slot == 0 else empty}
