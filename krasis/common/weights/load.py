"""Streaming checkpoint tensors into a model, ending with a strict check (nothing missing, nothing extra)."""

from torch import nn

from krasis.common.weights.checkpoint import CheckpointError, CheckpointReader


def _custom_loaders(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own their checkpoint layout (e.g. stacked experts), by name prefix."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "load_checkpoint_tensor")}


def _load_custom(custom: dict[str, nn.Module], name: str, tensor) -> bool:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = custom.get(".".join(parts[:cut]))
        if module is not None:
            return module.load_checkpoint_tensor(".".join(parts[cut:]), tensor)
    return False


def _summarize(kind: str, names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} {kind} tensor{'s' if len(names) != 1 else ''}: {shown}{more}"


def load_weights(model: nn.Module, reader: CheckpointReader, optional: tuple[str, ...] = ()) -> None:
    """Copy every checkpoint tensor into `model`; raise CheckpointError naming missing or unexpected ones.

    `optional` names checkpoint tensors that may be present and are ignored (e.g. lm_head under tied embeddings).
    """
    params = dict(model.named_parameters())
    custom = _custom_loaders(model)
    rename = getattr(model, "checkpoint_name", lambda name: name)  # e.g. a multimodal checkpoint's text model
    loaded, unexpected = set(), []
    for checkpoint_name, tensor in reader:
        name = rename(checkpoint_name)
        if name is None:
            continue
        if _load_custom(custom, name, tensor):
            continue
        if name in params:
            target = params[name].data
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(name)
        elif name not in optional:
            unexpected.append(name)
    owned = tuple(prefix + "." for prefix in custom)
    missing = [n for n in params if n not in loaded and not n.startswith(owned)]
    for prefix, module in custom.items():
        missing += [f"{prefix}.{key}" for key in module.missing_checkpoint_keys()]
    problems = []
    if missing:
        problems.append(_summarize("missing", missing))
    if unexpected:
        problems.append(_summarize("unexpected", unexpected))
    if problems:
        raise CheckpointError(f"{reader.model_dir}: checkpoint does not match the model: " + "; ".join(problems))
