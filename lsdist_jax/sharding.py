"""Device mesh from config, logical-axis rules, shardings for params/caches/batches, multi-host init.

Model code names axes logically (`embed`, `heads`, ...); this module alone maps them to mesh axes.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical axis -> mesh axis. Tensor parallelism splits attention heads and the MLP's hidden units
# over `model`; batches (and the KV cache's batch axis) split over `data`.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("head_dim", None),
    ("qkv", None),
    ("gate_up", None),
    ("norm", None),
    ("length", None),
    ("layers", None),
)

_initialized_distributed = False


def maybe_initialize_distributed(mesh_config) -> None:
  """Calls `jax.distributed.initialize()` once when the config asks for several processes."""
  global _initialized_distributed
  if not mesh_config.get("distributed", False) or _initialized_distributed:
    return
  kwargs = {}
  if mesh_config.get("coordinator_address"):
    kwargs["coordinator_address"] = mesh_config.coordinator_address
  if mesh_config.get("num_processes", 0) > 0:
    kwargs["num_processes"] = mesh_config.num_processes
  if mesh_config.get("process_id", -1) >= 0:
    kwargs["process_id"] = mesh_config.process_id
  jax.distributed.initialize(**kwargs)
  _initialized_distributed = True
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_devices(mesh_config=None) -> list:
  """The devices a mesh of this config spans: this process's (`mesh.span` "local", the default)
  or every process's ("global")."""
  span = mesh_config.get("span", "local") if mesh_config is not None else "local"
  if span not in ("local", "global"):
    raise ValueError(f"mesh.span={span!r}; expected 'local' or 'global'")
  return list(jax.devices() if span == "global" else jax.local_devices())


def to_host(tree):
  """numpy copies of a tree of device arrays; arrays spread over several processes (a global
  mesh) are gathered from all of them first, so every process gets the whole value."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def make_mesh(mesh_config=None, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` with axes ('data', 'model'); `data=-1` takes every device `model` leaves.

  By default the mesh spans this process's devices: with several processes (hosts), each one
  serves its own share of the requests (collection splits prompts across processes);
  `mesh.span="global"` spans every process's devices (one program over all of them)."""
  devices = list(devices if devices is not None else mesh_devices(mesh_config))
  n = len(devices)
  model = int(mesh_config.get("model", 1)) if mesh_config is not None else 1
  data = int(mesh_config.get("data", -1)) if mesh_config is not None else -1
  if model < 1 or n % model:
    raise ValueError(f"mesh.model={model} must divide the number of devices ({n})")
  if data == -1:
    data = n // model
  if data * model != n:
    raise ValueError(
        f"mesh data={data} x model={model} = {data * model} does not match the {n} devices; "
        "set mesh.data=-1 to use every device")
  return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for an array with these logical axes; an axis whose size the mesh axis does
  not divide is replicated instead (e.g. 9 heads over model=4)."""
  rule = dict(rules)
  spec = []
  for name, size in zip(logical_axes, shape):
    mesh_axis = rule.get(name) if name is not None else None
    if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]):
      mesh_axis = None
    spec.append(mesh_axis)
  return P(*spec)


def param_shardings(boxed_params, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a params tree whose leaves are `nn.LogicallyPartitioned` (from init)."""

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                   rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x, sharding):
  """`with_sharding_constraint`, or x itself when there is no mesh (sharding None)."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def data_spec(mesh: Mesh, batch: int) -> P:
  """The spec of an array whose leading axis is the batch: rows over `data` (if it divides)."""
  return logical_to_spec(("batch",), (batch,), mesh)


def rowwise(fn, mesh: Mesh | None, batch: int, num_rows: int):
  """fn(*rows, *shared, **static) run on each device's own rows: the first `num_rows` arguments have a
  leading batch axis of `batch` rows (split over `data`, every other axis whole on each
  device), the rest are replicated; the outputs are per row. Row-independent work (sampling
  from [B, V] logits) then moves no data between devices: vocab-split logits are gathered once
  on the way in, and no row is ever gathered from another device. Without a mesh: fn itself."""
  if mesh is None:
    return fn
  rows = data_spec(mesh, batch)

  def call(*args, **static):
    specs = tuple(rows if i < num_rows else P() for i in range(len(args)))
    return jax.shard_map(functools.partial(fn, **static), mesh=mesh, in_specs=specs,
                         out_specs=rows)(*args)

  return call


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def collective_counts(hlo_text: str) -> dict[str, dict[str, int]]:
  """Cross-device operations in a compiled program's HLO (`compiled.as_text()`), by where they
  run: "body" (a `while_loop`'s body: once per decode step), "cond" (its condition) and
  "outside". {where: {op: count}}; every branch of a conditional counts."""
  counts: dict[str, dict[str, int]] = {"body": {}, "cond": {}, "outside": {}}
  pattern = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    found = pattern.search(line)
    if found is None:
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    name = name.group(1) if name else ""
    where = "body" if "/while/body" in name else "cond" if "/while/cond" in name else "outside"
    counts[where][found.group(1)] = counts[where].get(found.group(1), 0) + 1
  return counts
