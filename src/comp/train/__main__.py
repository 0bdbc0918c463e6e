import sys

from comp.train.run import main

sys.exit(main())
