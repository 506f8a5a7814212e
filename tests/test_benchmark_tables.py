"""Tables in benchmarks/RESULTS.md are what their committed JSON gives."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(
      name, ROOT / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_scaling_table_matches_its_json():
  assert _load('scaling_table').main(['--check']) == 0


def test_scaling_table_covers_the_growth_axes():
  module = _load('scaling_table')
  cases = [c for c, _ in module.ORDER]
  # MLP width 100 -> 4096, batch 1 -> 512, CNN batch 2 -> 256.
  for case in ('fc60', 'fc60w4096', 'fc1', 'fc512', 'cnn2', 'cnn256',
               'cnn128same', 'resnet18'):
    assert case in cases


def test_graft_tables_on_the_learning_rate_page_match_their_json():
  module = _load('graft_study')
  assert module.main(['table', '--check']) == 0


def test_depth_table_covers_the_depths():
  module = _load('scaling_table')
  cases = [c for c, _ in module.DEPTH_ORDER]
  # MLP of width 32 at depths 10 -> 300, the CIFAR ResNets 20 -> 110.
  assert cases == ['mlp10', 'mlp50', 'mlp100', 'mlp300', 'resnet20',
                   'resnet56', 'resnet110']
  assert module.DEPTH_BEFORE_JSON.is_file()
  assert module.DEPTH_JSON.is_file()
  text = module.RESULTS_MD.read_text()
  assert module.DEPTH_START in text and module.DEPTH_END in text
