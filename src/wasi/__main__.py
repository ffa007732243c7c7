import sys

from wasi.cli import main

sys.exit(main())
