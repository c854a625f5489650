import sys

from data_prep.cli import main

sys.exit(main(prog="python -m data_prep"))
