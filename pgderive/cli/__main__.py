"""``python -m pgderive.cli``: the same as the ``pgderive`` command."""
from . import main

if __name__ == "__main__":
    main()
