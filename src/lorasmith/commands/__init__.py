"""One module per `lorasmith` subcommand, each exposing ``add_parser(subparsers)`` and ``run(args) -> exit code``."""

from lorasmith.commands import bench, chat, config, data, doctor, eval, export, merge, report, serve, train

COMMANDS = (train, chat, eval, merge, export, serve, report, data, bench, doctor, config)
"""In the order `lorasmith --help` lists them."""
