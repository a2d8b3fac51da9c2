"""`python -m mesh` is meshctl."""
import sys

from mesh.faces.cli import main

# Guarded: worker processes import the main module again (as __mp_main__).
if __name__ == "__main__":
    sys.exit(main())
