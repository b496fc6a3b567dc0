"""`jaxprune prune` (filled in by the pruning modules)."""


def add_prune_parser(sub) -> None:
    pass
