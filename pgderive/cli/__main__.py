"""``python -m pgderive.cli``: the same as the ``pgderive`` command."""
from . import main

main()
