import sys

from fedkd.cli import main

sys.exit(main())
