"""The adapter methods, registered by name. Importing this package registers all of them."""

from dreamlora.methods import dora, lora, loraplus, singlora  # noqa: F401  (registration)
from dreamlora.methods.base import METHODS, AdapterLayer, register

__all__ = ["METHODS", "AdapterLayer", "register"]
