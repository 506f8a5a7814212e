"""The harness's public API, and its model and method tables, entry by entry.

Outside ``bnp_optax/experiments`` (the tests aside, which test its parts),
code and pages use only the names ``bnp_optax.experiments`` exports. Every
entry of the model table builds a model that is what the entry says, and
every entry of the method table names things that exist.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest

from bnp_optax import experiments
from bnp_optax.experiments import _config
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _models
from bnp_optax.experiments import _train

ROOT = pathlib.Path(__file__).resolve().parent.parent
_PRIVATE = re.compile(
    r'bnp_optax\.experiments\._\w|'
    r'from\s+bnp_optax\.experiments\s+import\s+\(?\s*_\w')
_SKIPPED_DIRS = {'.git', '.venv', 'results', '_build', '_generated',
                 'node_modules', '__pycache__', 'tests'}


def _sources():
  for pattern in ('*.py', '*.ipynb', '*.md'):
    for path in ROOT.rglob(pattern):
      parts = path.relative_to(ROOT).parts
      if set(parts[:-1]) & _SKIPPED_DIRS or any(
          p.startswith('.') for p in parts[:-1]):
        continue
      if parts[:2] == ('bnp_optax', 'experiments'):
        continue
      yield path


@pytest.mark.parametrize('text', [
    'from bnp_optax.experiments import _data',
    'from bnp_optax.experiments._models import cross_entropy',
    'import bnp_optax.experiments._plot as plot',
    'from bnp_optax.experiments import (\n    _cli,',
])
def test_the_private_name_pattern_finds_private_imports(text):
  assert _PRIVATE.search(text)


def test_the_private_name_pattern_passes_the_public_api():
  assert not _PRIVATE.search('from bnp_optax import experiments\n'
                             'from bnp_optax.experiments import load_digits')


def test_no_module_outside_experiments_imports_its_private_names():
  sources = list(_sources())
  assert any(p.name == 'build.py' for p in sources)  # The scan sees them.
  assert any(p.suffix == '.ipynb' for p in sources)
  offenders = []
  for path in sources:
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if _PRIVATE.search(line):
        offenders.append(f'{path.relative_to(ROOT)}:{number}: {line.strip()}')
  assert not offenders, '\n'.join(offenders)


def test_every_exported_name_exists():
  for name in experiments.__all__:
    assert hasattr(experiments, name), name
  assert len(set(experiments.__all__)) == len(experiments.__all__)


def _param_paths(model, shape=(2, 32, 32, 3)):
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jnp.zeros(shape, jnp.float32))
  return [jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_leaves_with_path(variables['params'])]


@pytest.mark.parametrize('name', sorted(_models.MODELS))
def test_each_model_entry_is_what_it_says(name):
  entry = _models.MODELS[name]
  assert entry.name == name
  # One block per stage: the ResNets' families at their smallest.
  model = _models.make_model(name, 'none', 10, resnet_blocks=1)
  paths = _param_paths(model)
  assert paths, name
  assert entry.convolutional == any('Conv' in p for p in paths), paths
  if entry.conditioning:
    # Figure 8 differentiates the output layer, Dense_{len(hidden)}.
    last = f'Dense_{len(model.hidden)}'
    assert any(f"['{last}']" in p for p in paths), (last, paths)
    assert not any(f"['Dense_{len(model.hidden) + 1}']" in p for p in paths)
  if entry.convolutional:
    # CPU runs of a model with convolutions take one step per call.
    assert _train.auto_steps_per_call(1, 1000, model=name,
                                      platform='cpu') == 1
  assert _train.auto_steps_per_call(1, 1000, model=name,
                                    platform='gpu') == 1000


def test_the_paper_table_names_models_of_the_table():
  for model, _, _ in _methods.LEARNING_RATES:
    assert model in _models.MODELS, model
    assert _models.MODELS[model].paper_table, model


def test_an_unknown_model_names_the_table():
  with pytest.raises(ValueError, match='unknown model .*resnet18'):
    _models.make_model('resnet17', 'bn', 10)


@pytest.mark.parametrize('name', sorted(_methods.METHODS))
def test_each_method_entry_names_what_exists(name):
  method = _methods.METHODS[name]
  assert method.name == name
  assert method.norm in _models.NORMS
  assert method.optimizer in _methods.OPTIMIZERS
  assert method.rate_from is None or method.rate_from in _methods.METHODS
  config = _config.RunConfig(method=name)
  _config.check(config)  # The method is a valid choice of a run.
  assert config.resolved_optimizer() == method.optimizer
  lr, source = config.resolved_learning_rate()
  assert lr > 0 and source
  params = {'w': jnp.ones((3, 2))}
  state = _train.make_optimizer(config, lr, 10).init(params)
  bnp_state = optax.tree_utils.tree_get(state, 'ScaleByBNPState')
  assert (bnp_state is not None) == method.bnp


@pytest.mark.parametrize('optimizer', sorted(_methods.OPTIMIZERS))
def test_each_base_optimizer_updates(optimizer):
  config = _config.RunConfig(method='bn', optimizer=optimizer)
  _config.check(config)
  tx = _train.make_optimizer(config, 0.1, 10)
  params = {'w': jnp.ones(3)}
  updates, _ = tx.update({'w': jnp.ones(3)}, tx.init(params), params)
  assert bool(jnp.all(updates['w'] < 0)), (optimizer, updates)
