"""`python -m graphir ...` is the `graphir` command."""
import sys

from graphir.tools.cli import main

sys.exit(main())
