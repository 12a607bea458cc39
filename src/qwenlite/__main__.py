"""``python -m qwenlite``: list the commands (the registry :data:`qwenlite.cli.COMMANDS`)."""

from qwenlite.cli import COMMANDS


def listing() -> str:
    """The commands, one a line, with what each does."""
    width = max(len(name) for name in COMMANDS)
    return "\n".join(["qwenlite commands (each takes --help):"]
                     + [f"  python -m qwenlite.{name:<{width}} {what}"
                        for name, what in COMMANDS.items()])


if __name__ == "__main__":
    print(listing())
