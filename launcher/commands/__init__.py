"""One module per `dinolab` subcommand; each has `register(subparsers)` that adds its parser."""
