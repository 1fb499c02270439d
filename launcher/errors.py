"""`UserError`: something the user can fix; `dinolab` prints it as one line and exits with 2.

Its own module (not launcher/cli.py) so that `python -m launcher.cli`, where cli.py runs as
`__main__`, catches the same class the commands raise."""


class UserError(Exception):
    """Something the user can fix; printed as one line, exit code 2."""
