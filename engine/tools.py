"""Operator tools: populations, schedule tuning and schedule checks."""


def add_commands(commands) -> None:
    """Adds the operator subcommands to the ``tuanyuan`` parser."""
