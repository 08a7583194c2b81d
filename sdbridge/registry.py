"""The one registry of config groups: ``group -> option name -> config dataclass``, and each config dataclass names
the class it builds.

An option is registered where its class is defined::

    @builds("guidance", "sds", SDSConfig)
    class SDS(Guidance): ...

which stores ``SDSConfig`` as option ``sds`` of group ``guidance`` (the schema of ``conf/guidance/sds.yaml``, stored in
Hydra's ConfigStore as ``schema/guidance/sds``) and sets ``SDSConfig.builds = SDS``. Groups whose options build
nothing (trainer, logger, eval, prompt) register their dataclass with :func:`option`. :func:`build` turns any
registered config into its object.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

C = TypeVar("C", bound=type)

_OPTIONS: dict[str, dict[str, type]] = {}


def option(group: str, name: str) -> Callable[[C], C]:
    """Class decorator: ``config_cls`` is option ``name`` of ``group``."""

    def register(config_cls: C) -> C:
        known = _OPTIONS.setdefault(group, {})
        if known.get(name, config_cls) is not config_cls:
            raise ValueError(f"{group}/{name} is registered twice ({known[name].__name__}, {config_cls.__name__})")
        known[name] = config_cls
        return config_cls

    return register


def builds(group: str, name: str, config_cls: type) -> Callable[[C], C]:
    """Class decorator on the built class: registers ``config_cls`` as option ``name`` of ``group`` and makes it name
    the decorated class (``config_cls.builds``)."""

    def register(cls: C) -> C:
        option(group, name)(config_cls)
        config_cls.builds = cls
        return cls

    return register


def options(group: str) -> dict[str, type]:
    """``{option name: config dataclass}`` of ``group`` (a copy)."""
    return dict(_OPTIONS.get(group, {}))


def groups() -> dict[str, dict[str, type]]:
    return {group: dict(opts) for group, opts in _OPTIONS.items()}


def build(config: Any, *args: Any, **kwargs: Any) -> Any:
    """The object ``config`` describes: ``type(config).builds(config, *args, **kwargs)``."""
    cls = type(config).__dict__.get("builds")
    if cls is None:
        raise ValueError(f"no class is registered for config type {type(config).__name__}")
    return cls(config, *args, **kwargs)


__all__ = ["build", "builds", "groups", "option", "options"]
