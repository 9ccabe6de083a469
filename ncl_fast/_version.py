"""The version of ncl_fast, its one source: `setup.py` reads this file without
importing the package, `ncl_fast.__version__` and every command's `--version`
import it."""
__version__ = "0.1.0"
