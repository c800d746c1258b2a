"""Data and model parallelism with `jax.sharding`, T5X style.

A `Partitioner` owns a 2-D device mesh with axes ('data', 'model') and maps
parameters, optimizer state and batches to `NamedSharding`s through logical
axis rules, as T5X's `PjitPartitioner` does:

    batch -> 'data';  heads, mlp, vocab -> 'model';  embed -> replicated

Each model family names the logical axes of its parameters
(`Model.param_axes`) and of its decode cache (`Model.cache_axes`); a
dimension that the mesh axis does not divide falls back to replication, so the same code runs on
one CPU, 8 simulated devices or a TPU pod. Optimizer-state leaves that mirror
a parameter (same path suffix, same shape) follow its sharding; others (e.g.
Adafactor's factored moments) are replicated.

Multi-host: bind `partitioning.initialize_distributed.enabled = True` in gin
(the entry points call it before JAX starts its backends; the cluster is
auto-detected on TPU / SLURM / Open MPI, or give `coordinator_address`,
`num_processes`, `process_id`). Every host builds the same global batch (the
data pipeline is deterministic) and `shard_batch` hands JAX only the rows its
devices hold (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from dera_t5x.models import protocol

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Logical axis -> mesh axis (None: replicated).
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA_AXIS),
    ("heads", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("vocab", MODEL_AXIS),
    ("embed", None),
)

# (parameter path '/'-joined, ndim) -> its logical axes; each model family
# provides one (`Model.param_axes`).
ParamAxes = Callable[[str, int], tuple[str | None, ...]]


@gin.configurable
def initialize_distributed(enabled: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """`jax.distributed.initialize(...)` once, when enabled (multi-host jobs).

    Must run before anything touches a JAX device. The arguments left None
    are auto-detected from the cluster environment.
    """
    if enabled and not jax.distributed.is_initialized():
        # CPU processes exchange data through gloo (accelerators use their own links).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def partitioner_for(mesh_shape: Sequence[int] | None, param_axes: ParamAxes | None = None
                    ) -> "Partitioner | None":
    """A `Partitioner` when there is more than one device or a mesh is asked
    for; None (plain single-device jit) otherwise.

    Args:
      mesh_shape: (data, model), or None for every device on 'data'.
      param_axes: the model family's `param_axes` (None: parameters replicated).
    """
    if jax.device_count() > 1 or mesh_shape:
        return Partitioner(mesh_shape, param_axes)
    return None


def logical_to_mesh_axes(logical: Sequence[str | None]) -> tuple[str | None, ...]:
    """('embed', 'heads') -> (None, 'model') under `LOGICAL_RULES`."""
    rules = dict(LOGICAL_RULES)
    return tuple(rules.get(axis) if axis is not None else None for axis in logical)


def _path_names(path: tuple) -> tuple[str, ...]:
    """The dict keys / attribute names of a pytree key path, as strings."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
    return tuple(names)


class Partitioner:
    """Mesh, parameter / state / batch shardings for `mesh_shape=(data, model)`.

    Partitioners are equal when their mesh shapes and parameter rules are:
    they enter jitted functions as static arguments.

    Args:
      mesh_shape: (data, model) with data * model == number of devices; None
        puts every device on 'data' (pure data parallelism). Multi-host
        jobs call `initialize_distributed` before building one.
      param_axes: the model family's `param_axes`; None replicates parameters.

    Raises:
      ValueError: a mesh shape that is not 2-D or does not use every device.
    """

    def __init__(self, mesh_shape: Sequence[int] | None = None,
                 param_axes: ParamAxes | None = None):
        devices = jax.devices()
        if mesh_shape is None:
            mesh_shape = (len(devices), 1)
        try:
            mesh_shape = tuple(int(d) for d in mesh_shape)
        except (TypeError, ValueError):
            raise ValueError(f"mesh_shape must be (data, model) with positive sizes, got "
                             f"{mesh_shape!r}.") from None
        if len(mesh_shape) != 2 or min(mesh_shape) < 1:
            raise ValueError(f"mesh_shape must be (data, model) with positive sizes, got "
                             f"{mesh_shape}.")
        if mesh_shape[0] * mesh_shape[1] != len(devices):
            raise ValueError(f"mesh_shape {mesh_shape} needs {mesh_shape[0] * mesh_shape[1]} "
                             f"devices but there are {len(devices)}; use a shape whose product "
                             f"is {len(devices)}.")
        self.mesh = Mesh(np.asarray(devices).reshape(mesh_shape), (DATA_AXIS, MODEL_AXIS))
        self.param_axes = param_axes

    def _key(self) -> tuple:
        return (self.mesh, self.param_axes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Partitioner) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _param_axes(self, path: str, ndim: int) -> tuple[str | None, ...]:
        if self.param_axes is None:
            return (None,) * ndim
        return self.param_axes(path, ndim)

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA_AXIS]

    def _spec(self, logical: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        axes = []
        for mesh_axis, size in zip(logical_to_mesh_axes(logical), shape):
            divides = mesh_axis is not None and size % self.mesh.shape[mesh_axis] == 0
            axes.append(mesh_axis if divides else None)
        return PartitionSpec(*axes)

    def param_shardings(self, params: Any) -> Any:
        """A tree of `NamedSharding` like `params` (arrays or shape structs)."""
        def sharding(path, leaf):
            name = "/".join(_path_names(path))
            shape = np.shape(leaf)
            return NamedSharding(self.mesh, self._spec(self._param_axes(name, len(shape)),
                                                       shape))

        return jax.tree_util.tree_map_with_path(sharding, params)

    def tree_shardings(self, tree: Any, params: Any) -> Any:
        """Shardings for a tree whose leaves may mirror `params` (optimizer state).

        A leaf whose key path ends with a parameter's path and has its shape
        takes that parameter's sharding; every other leaf is replicated.
        """
        by_path = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            names = _path_names(path)
            by_path[names] = (np.shape(leaf), self._spec(
                self._param_axes("/".join(names), np.ndim(leaf)), np.shape(leaf)))

        def sharding(path, leaf):
            names, shape = _path_names(path), np.shape(leaf)
            for start in range(len(names)):
                match = by_path.get(names[start:])
                if match is not None and match[0] == shape:
                    return NamedSharding(self.mesh, match[1])
            return NamedSharding(self.mesh, PartitionSpec())

        return jax.tree_util.tree_map_with_path(sharding, tree)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def replicate(self, tree: Any) -> Any:
        """Places a tree, the same on every host, whole on every device."""
        return jax.device_put(tree, self.replicated())

    def state_shardings(self, state: Any) -> Any:
        """Shardings for a `trainer.TrainState` (params, opt_state; scalars and rng replicated)."""
        return state.replace(
            step=self.replicated(), rng=self.replicated(), skipped_batches=self.replicated(),
            params=self.param_shardings(state.params),
            opt_state=self.tree_shardings(state.opt_state, state.params))

    def shard_params(self, params: Any) -> Any:
        """Places a parameter tree (any tree: unmatched leaves are replicated)."""
        return jax.device_put(params, self.param_shardings(params))

    def shard_state(self, state: Any) -> Any:
        """Places a state on the mesh."""
        return jax.device_put(state, self.state_shardings(state))

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Rows over 'data' for an array [batch, ...] of `ndim` dims; scalars replicated."""
        if ndim == 0:
            return self.replicated()
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))

    def constrain(self, tree: Any, logical_axes: Any) -> Any:
        """`with_sharding_constraint` of a tree (e.g. a decode cache) by its
        logical axes (a tree of tuples like `tree`; inside jit)."""
        def constrain_leaf(axes, leaf):
            spec = self._spec(axes, np.shape(leaf))
            return jax.lax.with_sharding_constraint(leaf, NamedSharding(self.mesh, spec))

        return jax.tree_util.tree_map(constrain_leaf, logical_axes, tree,
                                      is_leaf=protocol.is_axes)

    def check_batch_size(self, batch_size: int) -> None:
        """A clear error when the global batch does not split over 'data'."""
        if batch_size % self.data_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {self.data_size} "
                             f"devices on the 'data' mesh axis; use a multiple of "
                             f"{self.data_size} or another mesh_shape.")

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Global arrays sharded over 'data' from the same global batch on every host.

        Args:
          batch: name -> array [batch, ...] (scalars are replicated), identical
            on every process.

        Raises:
          ValueError: the batch size does not divide over 'data'.
        """
        result = {}
        for name, value in batch.items():
            value = np.asarray(value)
            if value.ndim == 0:
                result[name] = jax.device_put(value, self.replicated())
                continue
            self.check_batch_size(value.shape[0])
            sharding = self.batch_sharding(value.ndim)
            start, stop = _local_rows(sharding, value.shape)
            result[name] = jax.make_array_from_process_local_data(
                sharding, value[start:stop], value.shape)
        return result


def _local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows [start, stop) of a [batch, ...] array that this process's devices hold."""
    rows = sorted({index[0].indices(shape[0])[:2]
                   for index in sharding.addressable_devices_indices_map(shape).values()})
    stop = rows[0][0]
    for row_start, row_stop in rows:
        if row_start > stop:
            raise ValueError(f"this process's devices hold non-adjacent batch rows {rows}; "
                             f"order the mesh devices so each host's are adjacent on 'data'.")
        stop = max(stop, row_stop)
    return rows[0][0], stop
