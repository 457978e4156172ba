"""Register hmt-adapter with PEFT and lm-eval when they are imported, so nobody has to ``import hmt_adapter``.

Run at every interpreter start by ``hmt_adapter_autoload.pth``, which the package installs next to itself in
site-packages (see setup.py). It only puts a small finder at the front of ``sys.meta_path``: no torch, no PEFT, no
other import happens at start. When a module it watches finishes importing, the finder's loader runs that module's
registration:

* ``peft``: ``import hmt_adapter`` (which registers the adapter type "HMT"), so ``PeftModel.from_pretrained``,
  ``AutoPeftModelForCausalLM.from_pretrained`` and every tool built on them load an HMT adapter.
* ``lm_eval.api.registry``: the lm-eval model ``hmt``, registered lazily as ``"hmt_adapter.integrations.lm_eval:HMTLM"`` (lm-eval
  imports it the first time ``--model hmt`` is asked for), so ``lm_eval --model hmt`` works.

``HMT_ADAPTER_AUTOLOAD=0`` (or ``false``/``no``/``off``) turns it off; then ``import hmt_adapter`` before loading an
adapter. A registration that fails does not break the import that triggered it: it becomes a warning.

See docs/design.md, "Loading without `import hmt_adapter`".
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself is not imported at start-up
if TYPE_CHECKING:
    from typing import Any, Callable, Optional

ENV_VAR = "HMT_ADAPTER_AUTOLOAD"
_OFF = ("0", "false", "no", "off")


def _register_with_peft(module: Any) -> None:
    import importlib

    importlib.import_module("hmt_adapter")


def _register_with_lm_eval(registry: Any) -> None:
    if "hmt" not in registry.model_registry:
        registry.model_registry.register("hmt", target="hmt_adapter.integrations.lm_eval:HMTLM")


#: Module name -> what to run once it has been imported.
HOOKS: dict[str, Callable[[Any], None]] = {
    "peft": _register_with_peft,
    "lm_eval.api.registry": _register_with_lm_eval,
}


def _run(name: str, module: Any) -> None:
    try:
        HOOKS[name](module)
    except Exception as exc:  # never break the user's import of PEFT or lm-eval because of us
        import warnings

        what = "the HMT adapter type with PEFT" if name == "peft" else "the lm-eval model 'hmt'"
        warnings.warn(
            f"hmt-adapter could not register {what} ({type(exc).__name__}: {exc}). `import hmt_adapter` shows the "
            f"full error; {ENV_VAR}=0 turns this automatic registration off.",
            RuntimeWarning,
            stacklevel=2,
        )


class _Loader:
    """Wraps a watched module's own loader: executes the module, then runs its hook."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Optional[Any]:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: Any) -> None:
        # The module sees its real loader, as if this wrapper had never been there.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _run(self._name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class HookFinder:
    """A ``sys.meta_path`` finder that finds nothing itself: for a watched name it asks the other finders and wraps
    the loader of the spec they return (`_Loader`)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if fullname not in HOOKS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if isinstance(finder, HookFinder) or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def enabled() -> bool:
    """False when ``HMT_ADAPTER_AUTOLOAD`` says off."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def install() -> None:
    """Put a `HookFinder` at the front of ``sys.meta_path`` (once), unless ``HMT_ADAPTER_AUTOLOAD`` is off. Modules
    already imported get their hook now."""
    if not enabled() or any(isinstance(f, HookFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, HookFinder())
    for name in HOOKS:
        if name in sys.modules:
            _run(name, sys.modules[name])
