"""A run's step cost against plain SGD's, measured side by side.

``--budget B`` gives every method the same compute: B steps of plain SGD on
the vanilla network (same model, batch size and data augmentation). Absolute
times on a shared machine drift by tens of percent within minutes, so the
cost of a method is never compared across processes or hours: before a
budgeted run trains, its compiled training call and the SGD reference's are
run alternately in the same process on the same batch (A B, B A, A B, ...,
each call waited for), and the step-cost ratio ``r`` is the median of the
per-round ratios, as ``benchmarks/bench_step.py``'s paired ratios. The run
then trains ``floor(B / r)`` steps. Compilation is timed apart and never
counted in ``r``.

The ratio is measured once per process for a configuration (every field of
its identity but the seed, the learning rate and the budget, which do not
change the cost), so the rates and seeds of one method in a sweep train the
same number of steps.
"""

from collections.abc import Callable
import statistics
import time
from typing import Any

import jax

_CACHE: dict[str, dict[str, Any]] = {}


def _timed(fn: Callable, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def paired_ratio(method_fn: Callable, method_args, sgd_fn: Callable,
                 sgd_args, *, steps_per_call: int, min_rounds: int = 7,
                 max_rounds: int = 41, seconds: float = 2.0,
                 warmup: int = 2) -> dict[str, Any]:
  """Times two compiled calls alternately; their step-cost ratio.

  Args:
    method_fn: the method's compiled training call.
    method_args: its arguments.
    sgd_fn: the SGD reference's compiled training call.
    sgd_args: its arguments.
    steps_per_call: training steps per call (the same for both).
    min_rounds: at least this many rounds (one call of each per round).
    max_rounds: at most this many rounds.
    seconds: stop after this much wall time once ``min_rounds`` are done.
    warmup: untimed calls of each first.

  Returns:
    ``ratio`` (median per-round ratio), ``ratio_of_medians``, the median
    step times in seconds (``method_step_s``, ``sgd_step_s``), ``rounds``.
  """
  for _ in range(warmup):
    _timed(method_fn, method_args)
    _timed(sgd_fn, sgd_args)
  times_m, times_s = [], []
  start = time.perf_counter()
  for i in range(max_rounds):
    if i % 2:
      ts = _timed(sgd_fn, sgd_args)
      tm = _timed(method_fn, method_args)
    else:
      tm = _timed(method_fn, method_args)
      ts = _timed(sgd_fn, sgd_args)
    times_m.append(tm)
    times_s.append(ts)
    if i + 1 >= min_rounds and time.perf_counter() - start > seconds:
      break
  ratios = [m / s for m, s in zip(times_m, times_s)]
  med_m = statistics.median(times_m) / steps_per_call
  med_s = statistics.median(times_s) / steps_per_call
  return dict(ratio=statistics.median(ratios), ratio_of_medians=med_m / med_s,
              method_step_s=med_m, sgd_step_s=med_s, rounds=len(ratios),
              steps_per_call=steps_per_call)


def memory(compiled) -> dict[str, Any]:
  """XLA's buffer sizes for a compiled call, and the device's peak so far.

  ``peak_bytes = argument + output - alias + temp`` is what the compiled
  call's buffers can hold at once (from the compiler, the same on every
  run); ``device_peak_bytes`` is the device allocator's peak of the whole
  process (GPU; None where the backend does not report it).
  """
  out = dict(peak_bytes=None, temp_bytes=None, device_peak_bytes=None)
  try:
    m = compiled.memory_analysis()
    out['temp_bytes'] = int(m.temp_size_in_bytes)
    out['peak_bytes'] = int(m.argument_size_in_bytes + m.output_size_in_bytes
                            - m.alias_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      out['device_peak_bytes'] = int(stats['peak_bytes_in_use'])
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def cached(key: str) -> dict[str, Any] | None:
  """The cost measured for ``key`` earlier in this process, if any."""
  found = _CACHE.get(key)
  return None if found is None else dict(found, cached=True)


def remember(key: str, cost: dict[str, Any]) -> None:
  _CACHE[key] = dict(cost)


def budget_steps(budget: int, ratio: float) -> int:
  """Steps of a method costing ``ratio`` x SGD in ``budget`` SGD steps.

  Example:
    >>> budget_steps(1000, 2.5)
    400
  """
  return max(1, int(budget // ratio))
