"""What `import scgpt_hf` defers, so that it (and ``scgpt-hf --help``) loads no heavy module (torch, transformers).

* Public names: `lazy_exports` gives a package a PEP 562 ``__getattr__`` and ``__dir__`` that import a name's
  module on its first use.
* Auto classes: `register_auto_classes` maps scGPT's config, models and tokenizer into transformers' Auto classes
  and makes ``save_pretrained`` write the code files and ``auto_map``. It needs the classes themselves, so torch.
  `install_auto_registration` (run by ``scgpt_hf/__init__``) registers at once if transformers' Auto classes are
  already loaded. Otherwise it registers as soon as they, or scgpt_hf's configuration, modeling or tokenization
  module, have been loaded, when this thread's outermost transformers or scgpt_hf import has finished: not
  earlier, because registering imports transformers modules that must not be half-initialised then
  (``transformers.modeling_layers``, for one, loads the Auto classes while it loads itself).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

# Loaded by every Auto class module (so by every use of an Auto class), and scgpt_hf's modules with the classes.
_TRIGGERS = (
    "transformers.models.auto.configuration_auto",
    "scgpt_hf.configuration_scgpt",
    "scgpt_hf.modeling_scgpt",
    "scgpt_hf.tokenization_scgpt",
)
_WATCHED = ("transformers", "scgpt_hf")  # packages whose imports are followed
_lock = threading.RLock()
_registered = False


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 ``__getattr__`` and ``__dir__`` for `package`, whose public names live in its submodules:
    `exports` maps a submodule (relative name) to the names it holds; a name's first use imports its module."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{home[name]}", package), name)
        setattr(sys.modules[package], name, value)  # later uses skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *home})

    return __getattr__, __dir__


def register_auto_classes() -> None:
    """Register ScGPTConfig (model type "scgpt") with AutoConfig, ScGPTModel with AutoModel, ScGPTForPreTraining
    with AutoModelForPreTraining, ScGPTForCellClassification with AutoModelForSequenceClassification and
    ScGPTTokenizer with AutoTokenizer, then `hub.register_remote_code` (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForPreTraining,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        from .configuration_scgpt import ScGPTConfig
        from .hub import register_remote_code
        from .modeling_scgpt import ScGPTForCellClassification, ScGPTForPreTraining, ScGPTModel
        from .tokenization_scgpt import ScGPTTokenizer

        AutoConfig.register(ScGPTConfig.model_type, ScGPTConfig)
        AutoModel.register(ScGPTConfig, ScGPTModel)
        AutoModelForPreTraining.register(ScGPTConfig, ScGPTForPreTraining)
        AutoModelForSequenceClassification.register(ScGPTConfig, ScGPTForCellClassification)
        AutoTokenizer.register(ScGPTConfig, tokenizer_class=ScGPTTokenizer)
        register_remote_code()
        _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finder that follows transformers and scgpt_hf imports (it gives their source files a `_CountingLoader`)
    and runs `register_auto_classes` once a trigger module is loaded and this thread's outermost such import has
    finished. It removes itself from ``sys.meta_path`` before registering."""

    def __init__(self) -> None:
        self.depth = threading.local()  # transformers / scgpt_hf modules executing in this thread

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name.partition(".")[0] not in _WATCHED or self not in sys.meta_path:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                if type(spec.loader) is importlib.machinery.SourceFileLoader:
                    spec.loader = _CountingLoader(spec.loader.name, spec.loader.path, self)
                return spec
        return None

    def enter(self) -> None:
        self.depth.value = getattr(self.depth, "value", 0) + 1

    def leave(self, loaded: bool) -> None:
        self.depth.value -= 1
        if loaded and self.depth.value == 0 and any(name in sys.modules for name in _TRIGGERS):
            with _lock:
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
            register_auto_classes()


class _CountingLoader(importlib.machinery.SourceFileLoader):
    """The usual source loader, telling its finder when a module starts and finishes executing."""

    def __init__(self, fullname: str, path: str, finder: _RegisterAfterImport) -> None:
        super().__init__(fullname, path)
        self.finder = finder

    def exec_module(self, module: ModuleType) -> None:
        self.finder.enter()
        loaded = False
        try:
            super().exec_module(module)
            loaded = True
        finally:
            self.finder.leave(loaded)


def install_auto_registration() -> None:
    """Register with the Auto classes at once if they are loaded, else when they or scgpt_hf's classes load."""
    if "transformers.models.auto.configuration_auto" in sys.modules:
        register_auto_classes()
        return
    with _lock:
        if not _registered and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
