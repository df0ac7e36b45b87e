import sys

from jcompress.cli import main

sys.exit(main())
