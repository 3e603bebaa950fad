"""`python -m part COMMAND [args]`: runs one of the commands of part.cli."""

from part.cli import main
from part.exit_codes import exit_process

if __name__ == "__main__":
    exit_process(main())
