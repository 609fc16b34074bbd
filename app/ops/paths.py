"""Where the database program ships: top-level migrations/ and sql/ in a checkout, or
copies inside the package when installed from a wheel."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # app/, the installed package


def _find(name: str) -> Path:
    for candidate in (_PACKAGE.parent / name, _PACKAGE / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ directory next to the dlw package")


def migrations_dir() -> Path:
    return _find("migrations")


def sql_dir() -> Path:
    return _find("sql")
