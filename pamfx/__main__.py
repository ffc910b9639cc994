"""`python -m pamfx demo`: the command line lives in pamfx.demo.cli."""
import sys

from pamfx.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
