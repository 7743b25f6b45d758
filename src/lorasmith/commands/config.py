"""`lorasmith config [CONFIG] [key=value ...]`: every key with its default and meaning, or a resolved config."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="list every config key with its default and meaning, or print a resolved config")
    p.add_argument("config", nargs="?", help="YAML file to resolve (with overrides) instead of listing the keys")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=run)


def run(args) -> int:
    from lorasmith import config

    if args.config or args.overrides:
        print(config.to_yaml(config.load(args.config, args.overrides)), end="")
    else:
        print(config.describe())
    return 0
