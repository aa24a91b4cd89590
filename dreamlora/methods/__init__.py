"""The adapter methods, registered by name. Importing this package imports every module of this folder, and
each registers its method with `@register`: adding a method is adding a file here (or, from another package,
an entry in the `dreamlora.methods` entry-point group, loaded on the first registry lookup)."""

import importlib
import pkgutil

from dreamlora.methods.base import EXPORT_FORMATS, METHODS, AdapterLayer, ExportUnsupported, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["EXPORT_FORMATS", "METHODS", "AdapterLayer", "ExportUnsupported", "register"]
