"""The registry of `transfer` options: `build(cfg, data) -> TransferSet`, one file per option."""
from kdrun.registry import Registry

TRANSFERS: Registry = Registry("transfer")


def register_transfer(name: str, description: str | None = None):
    return TRANSFERS.register(name, description)
