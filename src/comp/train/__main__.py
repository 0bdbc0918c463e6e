import sys

from comp.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
