"""One module per `lorasmith` subcommand, each exposing ``add_parser(subparsers)`` and ``run(args) -> exit code``."""

from lorasmith.commands import bench, chat, config, data, doctor, eval, export, merge, serve, train

COMMANDS = (train, chat, eval, merge, export, serve, data, bench, doctor, config)
"""In the order `lorasmith --help` lists them."""
