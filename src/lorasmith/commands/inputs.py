"""What a command-line argument is, so commands can take what users naturally type."""

from __future__ import annotations

from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")


def is_data_path(arg: str | None) -> bool:
    """A data file (or a `datasets` save_to_disk folder) given where a config file is expected."""
    if not arg:
        return False
    path = Path(arg)
    return path.suffix.lower() in DATA_SUFFIXES or (path.is_dir() and (path / "dataset_info.json").is_file())
