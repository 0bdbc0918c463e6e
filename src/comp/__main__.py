import sys

from comp.cli import main

sys.exit(main())
