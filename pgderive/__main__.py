"""``python -m pgderive``: the same as the ``pgderive`` command."""
from .cli import main

main()
