"""The reproduction report (docs/reproduction.md) is whole and up to date."""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / 'docs' / 'reproduction.md'


def _build_module():
  spec = importlib.util.spec_from_file_location(
      'reproduction_build', ROOT / 'docs' / 'reproduction' / 'build.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def build():
  return _build_module()


def _section(page: str, anchor: str) -> str:
  match = re.search(rf'^\({re.escape(anchor)}\)=\n(.*?)(?=^\([\w-]+\)=\n|\Z)',
                    page, re.S | re.M)
  assert match, f'no section ({anchor})= in {PAGE.name}'
  return match.group(1)


def test_tables_match_the_committed_runs(build):
  page = PAGE.read_text()
  assert build.render(page, build.blocks()) == page, (
      'docs/reproduction.md differs from its committed runs: run '
      'python docs/reproduction/build.py')


@pytest.mark.parametrize('experiment', [
    'fig3-mnist', 'fig3-cifar10', 'fig4-left', 'fig4-right-fc',
    'fig4-right-cnn', 'fig5-left', 'fig5-right', 'fig6-left', 'fig6-right',
    'fig8', 'table1'])
def test_every_experiment_has_command_figure_numbers_verdict(experiment):
  page = PAGE.read_text()
  section = _section(page, experiment)
  assert '**Setting.**' in section and '**Claim.**' in section
  assert not re.search(r'VERDICT_|CUT_|TODO|TBD', section)
  assert re.search(r'```bash\n(python|bash) ', section), 'no command'
  verdict = re.search(r'\*\*Verdict: (reproduced|partly reproduced|not '
                      r'reproduced|not run)\.?\*\*', section)
  assert verdict, 'no verdict'
  if verdict.group(1) == 'not run':
    # Only where the data cannot be had here; the section says why.
    assert 'not on this machine' in section
    return
  figures = re.findall(r'!\[[^\]]*\]\((_static/[^)]+\.png)\)', section)
  assert figures, 'no figure'
  for figure in figures:
    assert (ROOT / 'docs' / figure).is_file(), figure
  numbers = re.search(
      rf'<!-- BEGIN numbers {experiment} -->\n(.*?)<!-- END numbers', section,
      re.S)
  assert numbers and '|' in numbers.group(1), 'no numbers table'


def test_every_committed_run_is_in_the_report(build):
  suites = {s for e in build.EXPERIMENTS for s in e.suites}
  on_disk = {p.name for p in (ROOT / 'docs' / 'reproduction' / 'runs')
             .iterdir() if p.is_dir()}
  assert on_disk <= suites, on_disk - suites


def test_check_mode_reports_a_stale_table(build, tmp_path, monkeypatch):
  stale = re.sub(r'(<!-- BEGIN numbers fig3-mnist -->\n).*?(<!-- END)',
                 r'\1| stale |\n\2', PAGE.read_text(), flags=re.S)
  page = tmp_path / 'reproduction.md'
  page.write_text(stale)
  monkeypatch.setattr(build, 'PAGE', page)
  assert build.main(['--check']) == 1
  assert page.read_text() == stale
