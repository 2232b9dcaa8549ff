"""``python -m synthetic``: see :mod:`synthetic.cli`."""
import sys

from synthetic.cli import main
from utils import run_cli

sys.exit(run_cli(main, prog="python -m synthetic"))
