"""``python -m bnp_optax.experiments``."""

import sys

from bnp_optax.experiments import _cli

if __name__ == '__main__':
  sys.exit(_cli.main())
