"""Smoke test of benchmarks/bench_step.py: it runs and writes its JSON.

Two timed rounds of the smallest case; nothing is asserted about time.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'benchmarks' / 'bench_step.py'


def test_bench_step_writes_results(tmp_path):
  out = tmp_path / 'results.json'
  env = dict(os.environ, JAX_NUMPY_RANK_PROMOTION='raise',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-W', 'error', str(SCRIPT), '--cases', 'fc1',
       '--steps', '2', '--warmup', '1', '--compile-reps', '1',
       '--out', str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'bnp/sgd' in proc.stdout
  data = json.loads(out.read_text())
  assert {'platform', 'device_kind', 'jax'} <= set(data['device'])
  (result,) = data['results']
  assert result['case'] == 'fc1' and result['batch_size'] == 1
  assert set(result['variants']) == {'sgd', 'bnp', 'bn'}
  for v in result['variants'].values():
    for key in ('median_ms', 'p10_ms', 'p90_ms', 'lower_s', 'compile_s'):
      assert v[key] > 0, key
    assert v['hlo']['kernels'] >= v['hlo']['fusions'] > 0
    assert v['jit_cache_size'] == 1  # traced once, no retrace per step
    assert v['memory'] is None or v['memory']['peak_bytes'] > 0
  bnp = result['variants']['bnp']
  # Two vectors of fan-in features per layer: 2 * (784 + 100 + 100 + 100).
  assert bnp['opt_state_floats'] == bnp['opt_state_expected_floats'] == 2168
  for key in ('bnp/sgd', 'bnp/bn', 'bn/sgd'):
    assert result['ratios'][key]['of_medians'] > 0
    assert result['ratios'][key]['paired'] > 0
