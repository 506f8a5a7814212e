"""Optional dependencies of the harness, named with the extra to install."""

import importlib.util

# Import names whose package on PyPI is named otherwise.
_PACKAGES = {'orbax.checkpoint': 'orbax-checkpoint', 'sklearn': 'scikit-learn'}


class MissingDependency(ImportError):
  """An optional dependency is missing; names the extra to install."""

  def __init__(self, module: str, purpose: str,
               extra: str = 'experiments'):
    super().__init__(f'{purpose} needs {module}: pip install '
                     f"'bnp_optax[{extra}]'")


def require(module: str, purpose: str) -> None:
  """Raises MissingDependency unless ``module`` can be imported.

  Args:
    module: the import name, e.g. ``'orbax.checkpoint'``.
    purpose: what needs it, for the message.
  """
  try:
    found = importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    found = False
  if not found:
    raise MissingDependency(_PACKAGES.get(module, module), purpose)
