"""One module per command (or group of related commands): each defines, side by side, a `<command>_parser(sub)`
that adds the command's flags and help, and the handler those flags feed. `jobs.cli.COMMANDS` lists them.

Handlers import the library inside their body, so that parsing and `--help` load no torch, Ray or DuckDB."""
