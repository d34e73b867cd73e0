"""``python -m pgderive``: the same as the ``pgderive`` command."""
from .cli import main

if __name__ == "__main__":
    main()
