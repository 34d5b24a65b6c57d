"""Load a recipe: YAML -> OmegaConf (interpolation, dotted overrides) -> pydantic schema -> checks.

Every failure a user can fix becomes one `UserError` that names the file, the line, the key and
the fix. Lines come from the YAML node marks, so a message points into the file the user edits.
"""

from __future__ import annotations

import difflib
import importlib.resources
import typing
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from recipe_runner.errors import UserError
from recipe_runner.recipe.checks import cross_checks
from recipe_runner.recipe.schema import Recipe


def asset_path(rel: str) -> str:
    """Absolute path of a file shipped inside the package (the tiny default model and data)."""
    return str(importlib.resources.files("recipe_runner") / "assets" / rel)


def _register_resolvers() -> None:
    # OmegaConf >= 2.4 names it register_resolver; the Neuron images' 2.3 register_new_resolver.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    # NxDT registers `multiply` for model_parallel_size: ${multiply:TP,PP}.
    if not OmegaConf.has_resolver("multiply"):
        register("multiply", lambda a, b: a * b)
    # ${asset:tiny/model} -> a path inside the installed package, so tiny recipes run anywhere.
    if not OmegaConf.has_resolver("asset"):
        register("asset", asset_path)


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line number."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (str(k.value),)
                index[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[path + (str(i),)] = v.start_mark.line + 1
                walk(v, path + (str(i),))

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return index


def _leaf_keys(data, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            keys |= _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return keys


def parse_override(text: str) -> tuple[str, object, bool]:
    """Hydra-style `a.b=value` (value parsed as YAML), `+a.b=value` (add) or `~a.b` (delete)."""
    if text.startswith("~"):
        return text[1:], None, True
    key, sep, value = text.partition("=")
    key = key.lstrip("+").strip()
    if not sep or not key:
        raise UserError(f"override {text!r}: expected key=value, e.g. trainer.max_steps=10")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: the value is not valid YAML ({e.problem})") from None
    return key, parsed, False


def _migrate_legacy(raw: dict, notes: list[str]) -> None:
    """Spellings NxDT material uses that are not the keys NxDT reads: older DPO configs put the
    DPO keys under data.alignment_strategy.dpo (with max_dpo_prompt_length), and the tutorial's
    ORPO block writes model.encoder_seq_len. NxDT silently ignores what it does not read; here
    they are mapped to the real keys with a note."""
    model = raw.get("model")
    if isinstance(model, dict) and "encoder_seq_len" in model:
        model["encoder_seq_length"] = model.pop("encoder_seq_len")  # the tutorial's ORPO block spells it so
        notes.append("model.encoder_seq_len (the NxDT tutorial's spelling) read as model.encoder_seq_length")
    legacy = (raw.get("data") or {}).pop("alignment_strategy", None) if isinstance(raw.get("data"), dict) else None
    if not legacy:
        return
    dpo = dict((legacy or {}).get("dpo") or {})
    if "max_dpo_prompt_length" in dpo:
        dpo["max_prompt_length"] = dpo.pop("max_dpo_prompt_length")
    raw.setdefault("model_alignment_strategy", {}).setdefault("dpo", dpo)
    notes.append("data.alignment_strategy.dpo (older NxDT layout) read as model_alignment_strategy.dpo")


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (), device: str | None = None) -> Recipe:
    """Load, interpolate, override, validate. `device` (resolved: cpu/cuda/xla) picks the
    device-dependent checks; None resolves `runner.device` on this machine."""
    _register_resolvers()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path}: no such file. Recipes in this repository live under recipes/.")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of sections (trainer:, data:, model:, ...)")
    lines = _line_index(text)
    notes: list[str] = []
    _migrate_legacy(raw, notes)
    explicit = _leaf_keys(raw)
    override_keys: set[str] = set()

    cfg = OmegaConf.create(raw)
    for text_override in overrides:
        key, value, delete = parse_override(text_override)
        override_keys.add(key)
        try:
            if delete:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is not None and leaf in node:
                    node.pop(leaf)
            else:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as e:
            raise UserError(f"override {text_override!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    explicit |= override_keys
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        line = lines.get(tuple(str(key).split(".")))
        where = f"{path}:{line}" if line else str(path)
        raise UserError(f"{where}: {key}: cannot resolve interpolation: {getattr(e, 'msg', e)}") from None

    def where(loc: tuple[str, ...]) -> str:
        dotted = ".".join(loc)
        if any(dotted == k or dotted.startswith(k + ".") for k in override_keys):
            return f"{path} (command-line override)"
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f"{path}:{lines[loc[:n]]}"
        return str(path)

    try:
        recipe = Recipe.model_validate(resolved)
    except ValidationError as e:
        raise UserError(_format_validation(e, where)) from None

    from recipe_runner.backends import resolve_device

    device = device or resolve_device(recipe.runner.device)
    problems = cross_checks(recipe, device)
    if problems:
        raise UserError("\n".join(f"{where(tuple(k.split('.')))}: {k}: {msg}" for k, msg in problems))
    recipe._source_path = str(path)
    recipe._resolved = resolved
    recipe._explicit_keys = frozenset(explicit)
    for note in notes:
        print(f"note: {note}")
    return recipe


# --------------------------------------------------------------------------- messages
def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the key at loc[-1] (for did-you-mean suggestions)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None:
            return None
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model


def _unwrap(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _format_validation(error: ValidationError, where) -> str:
    messages = []
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _model_at(loc)
            names = [f.alias or n for n, f in model.model_fields.items()] if model else []
            close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"valid keys here: {', '.join(names)}"
            messages.append(f"{where(loc)}: unknown key `{dotted}`: {hint}")
        elif kind == "missing":
            messages.append(f"{where(loc[:-1])}: missing required key `{dotted}`: add it to the recipe "
                            f"(see the recipe reference in README.md)")
        else:
            got = err.get("input")
            messages.append(f"{where(loc)}: `{dotted}`: {err['msg']} (got {got!r})")
    return "\n".join(messages)
