"""Command-line subcommands of the model layer: one module per family, each with add_parsers(subparsers)."""
