# Backbone registry: maps recipe backbone names to factory functions that build embedding networks.
"""Backbone registry.

Model modules decorate their factory functions with ``@register_backbone("name")``;
builders call ``create_backbone(name, ...)`` with the values from the recipe.
A factory takes keyword-only arguments ``embedding_size``, ``dropout``, ``input_size``
plus any backbone-specific options, and returns a plain ``nn.Module`` mapping
``(B, 3, input_size, input_size)`` images to ``(B, embedding_size)`` fp32 embeddings, with an
``fsdp_units()`` method listing its repeated blocks. Activation checkpointing is not a model
option: ``create_backbone(..., activation_checkpointing=True)`` applies
``toolkit.models.wrapping.apply_activation_checkpointing`` to the built model.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, List

import torch

from toolkit.errors import FaceCLError

BackboneFactory = Callable[..., torch.nn.Module]

_BACKBONE_FACTORIES: Dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``factory`` under ``name``; returns the factory unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        already_registered = _BACKBONE_FACTORIES.get(name)
        if already_registered is not None and already_registered is not factory:
            # Two different factories under one name is a programming error, not a user error.
            raise ValueError(
                f"backbone {name!r} is already registered by "
                f"{already_registered.__module__}.{already_registered.__qualname__}"
            )
        _BACKBONE_FACTORIES[name] = factory
        return factory

    return decorator


def list_backbones() -> List[str]:
    """Sorted names of all registered backbones."""
    return sorted(_BACKBONE_FACTORIES)


def _unknown_backbone_message(name: str) -> str:
    valid_names = list_backbones()
    closest = difflib.get_close_matches(str(name), valid_names, n=1, cutoff=0.0)
    suggestion = f"; closest match: {closest[0]!r}" if closest else ""
    return f"unknown backbone {name!r}{suggestion}; valid backbones: {', '.join(valid_names)}"


def _check_backbone_options(name: str, factory: BackboneFactory, options: Dict[str, Any]) -> None:
    """Raise FaceCLError for options the factory does not accept (e.g. a typo in the recipe)."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = sorted(
        p_name
        for p_name, p in parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise FaceCLError(
            f"backbone {name!r} does not accept option(s) {', '.join(map(repr, unknown))}; "
            f"accepted options: {', '.join(accepted)}"
        )


def check_backbone_name(name: str) -> None:
    """FaceCLError (naming the closest registered backbone) when `name` is not registered."""
    if not isinstance(name, str) or name not in _BACKBONE_FACTORIES:
        raise FaceCLError(_unknown_backbone_message(name))


def create_backbone(
    name: str,
    *,
    embedding_size: int = 512,
    dropout: float = 0.0,
    input_size: int = 112,
    activation_checkpointing: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build the backbone registered under ``name``.

    Raises FaceCLError for an unknown name (naming the closest registered one) or for
    options the backbone does not accept.
    """
    factory = _BACKBONE_FACTORIES.get(name) if isinstance(name, str) else None
    if factory is None:
        raise FaceCLError(_unknown_backbone_message(name))
    options = dict(embedding_size=embedding_size, dropout=dropout, input_size=input_size, **kwargs)
    _check_backbone_options(name, factory, options)
    model = factory(**options)
    if activation_checkpointing:
        from toolkit.models.wrapping import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    return model
