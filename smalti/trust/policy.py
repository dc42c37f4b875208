"""The routing policy: which parameters may learn from which provenance classes, and when.

Format (YAML), signed by the model-risk authority (``policy.yaml.sig``)::

    policy: shakespeare-demo
    taxonomy: {name: shakespeare, fingerprint: <sha256 of the signed taxonomy>}
    model: {fingerprint: <sha256 of the parameter names and shapes>}   # optional
    default: allow
    rules:                                   # the first rule that matches decides
      - classes: [gutenberg/history]         # taxonomy nodes (a node covers its subtree), or "*"
        params: [tok_emb]                    # globs over module or parameter names
        action: deny
      - classes: ["*"]
        params: ["blocks.0", "blocks.1"]
        phase: 0.5dur..1dur                  # [start, end) in any Time unit; default: always
        action: deny
    exclusive:                               # class C may update only P; no other class may update P
      - classes: [gutenberg/tragedy/hamlet]
        params: ["@adapter"]                 # this class's adapter: Smalti's (model.adapters) or LoRA (model.lora)

Semantics, for an example of class ``c``, parameter ``p`` and time ``t``:

1. If ``p`` is confined by an exclusive rule to class node ``C`` and ``c`` is
   not under ``C``: deny.
2. If ``c`` is under the class node of an exclusive rule and ``p`` is not one
   of that rule's parameters: deny.
3. Otherwise the first rule whose classes cover ``c``, whose patterns match
   ``p`` and whose phase contains ``t`` decides.
4. Otherwise: allow if ``p`` is an exclusive parameter of ``c``'s rule, else
   the default.

An example with several classes (after MixUp, say) may update a parameter
only if each of its classes may. A pattern matches a parameter if it matches
its full name (``tok_emb.weight``) or the name of a module that owns it
(``tok_emb``, ``blocks.0``); ``*`` matches across dots.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from smalti.core.time import Time
from smalti.errors import SmaltiError
from smalti.trust.keys import read_signature, verify_bytes
from smalti.trust.taxonomy import Taxonomy

ADAPTER_MACRO = "@adapter"
ADAPTER_FORMS = (
    "*.adapters.{key}",
    "*.lora_A.{key}",
    "*.lora_B.{key}",
    "*.lora_embedding_A.{key}",
    "*.lora_embedding_B.{key}",
)


class PolicyError(SmaltiError):
    """The policy is malformed, unsigned, altered, or does not fit the model or taxonomy."""


def adapter_key(class_name: str) -> str:
    """The module name of a class's adapter: the class path with every non-identifier character as ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", class_name)


def model_fingerprint(named_shapes: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    text = "\n".join(f"{name} {list(shape)}" for name, shape in sorted(named_shapes))
    return hashlib.sha256(text.encode()).hexdigest()


def parse_phase(text: str | None, where: str) -> tuple[Time, Time] | None:
    if text is None:
        return None
    parts = str(text).split("..")
    if len(parts) != 2:
        raise PolicyError(f"{where}: phase {text!r} must be 'START..END', e.g. '0.5dur..1dur' or '0ba..500ba'")
    try:
        return Time.parse(parts[0]), Time.parse(parts[1])
    except ValueError as error:
        raise PolicyError(f"{where}: {error}") from None


@dataclass(frozen=True)
class Rule:
    classes: tuple[str, ...]  # taxonomy nodes, or ("*",)
    params: tuple[str, ...]
    action: str  # "allow" | "deny"
    phase: tuple[Time, Time] | None = None
    name: str = ""

    def covers(self, class_name: str) -> bool:
        return any(c == "*" or Taxonomy.covers(c, class_name) for c in self.classes)


@dataclass(frozen=True)
class ExclusiveRule:
    classes: tuple[str, ...]
    params: tuple[str, ...]

    def covers(self, class_name: str) -> bool:
        return any(Taxonomy.covers(c, class_name) for c in self.classes)


def matches(pattern: str, parameter: str) -> bool:
    """Whether a glob matches a parameter or any module owning it."""
    if fnmatch.fnmatchcase(parameter, pattern):
        return True
    parts = parameter.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


@dataclass
class Policy:
    name: str
    default: str
    rules: list[Rule]
    exclusive: list[ExclusiveRule]
    taxonomy_name: str | None
    taxonomy_fingerprint: str | None
    model_fingerprint: str | None
    fingerprint: str  # sha256 of the file's bytes ("" for a policy made in code)

    @classmethod
    def parse(cls, data: bytes, where: str) -> "Policy":
        try:
            spec = yaml.safe_load(data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise PolicyError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
        if not isinstance(spec, dict):
            raise PolicyError(f"{where}: a policy is a mapping with 'policy', 'taxonomy', 'default' and 'rules'")
        unknown = set(spec) - {"policy", "taxonomy", "model", "default", "rules", "exclusive"}
        if unknown:
            raise PolicyError(f"{where}: unknown key '{sorted(unknown)[0]}'")
        default = spec.get("default", "allow")
        if default not in ("allow", "deny"):
            raise PolicyError(f"{where}: 'default' must be allow or deny, got {default!r}")
        taxonomy = spec.get("taxonomy") or {}
        rules = [_rule(entry, f"{where}: rule {i + 1}") for i, entry in enumerate(spec.get("rules") or [])]
        exclusive = [
            _exclusive(entry, f"{where}: exclusive rule {i + 1}") for i, entry in enumerate(spec.get("exclusive") or [])
        ]
        return cls(
            name=str(spec.get("policy") or Path(where).stem),
            default=default,
            rules=rules,
            exclusive=exclusive,
            taxonomy_name=taxonomy.get("name"),
            taxonomy_fingerprint=taxonomy.get("fingerprint"),
            model_fingerprint=(spec.get("model") or {}).get("fingerprint"),
            fingerprint=hashlib.sha256(data).hexdigest(),
        )

    @classmethod
    def load(cls, path: str | Path, taxonomy: Taxonomy, signed: bool = True) -> "Policy":
        """Read and, by default, verify the model-risk authority's signature (its key comes from the taxonomy)."""
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"{path}: policy not found")
        data = path.read_bytes()
        if signed:
            key = taxonomy.key_of_role("model-risk")
            if key is None:
                raise PolicyError(f"{path}: taxonomy '{taxonomy.name}' names no model-risk authority to sign policies")
            signature = read_signature(path)
            if signature.key_id != key.key_id:
                raise PolicyError(
                    f"{path}: signed by key {signature.key_id}, not by the model-risk authority's key {key.key_id}"
                )
            verify_bytes(data, signature, key, where=str(path))
        return cls.parse(data, str(path))

    # ------------------------------------------------------------------ checks

    def check(self, taxonomy: Taxonomy, parameter_names: Sequence[str], fingerprint: str, where: str) -> None:
        """Everything that would make the policy mean something else than its author intended."""
        if self.taxonomy_fingerprint is None:
            raise PolicyError(f"{where}: names no taxonomy fingerprint (run 'smalti policy check --bind')")
        if self.taxonomy_fingerprint != taxonomy.fingerprint:
            raise PolicyError(
                f"{where}: written for taxonomy {self.taxonomy_fingerprint[:12]}..., not "
                f"'{taxonomy.name}' ({taxonomy.fingerprint[:12]}...)"
            )
        if self.model_fingerprint is not None and self.model_fingerprint != fingerprint:
            raise PolicyError(
                f"{where}: written for a model with fingerprint {self.model_fingerprint[:12]}..., "
                f"this model's is {fingerprint[:12]}... (layers or adapters differ)"
            )
        groups: list[tuple[str, Sequence[Rule | ExclusiveRule]]] = [
            ("rule", self.rules),
            ("exclusive rule", self.exclusive),
        ]
        for label, rules in groups:
            for i, rule in enumerate(rules, start=1):
                for node in rule.classes:
                    if node != "*" and node not in taxonomy:
                        raise PolicyError(f"{where}: {label} {i}: class '{node}' is not in taxonomy '{taxonomy.name}'")
                for written in rule.params:
                    expanded = self._expand_one(written, rule.classes)
                    if not any(matches(pattern, p) for pattern in expanded for p in parameter_names):
                        shown = written if written != ADAPTER_MACRO else f"{written} ({', '.join(expanded)})"
                        raise PolicyError(f"{where}: {label} {i}: pattern '{shown}' matches no parameter of the model")
        self._check_exclusive_overlap(parameter_names, where)

    def _expand(self, rule: Rule | ExclusiveRule) -> list[str]:
        return [pattern for written in rule.params for pattern in self._expand_one(written, rule.classes)]

    @staticmethod
    def _expand_one(pattern: str, classes: Sequence[str]) -> list[str]:
        """``@adapter``: each class's own adapter, Smalti's (``model.adapters``) or a LoRA one (``model.lora``)."""
        if pattern != ADAPTER_MACRO:
            return [pattern]
        return [form.format(key=adapter_key(c)) for c in classes for form in ADAPTER_FORMS]

    def _check_exclusive_overlap(self, parameter_names: Sequence[str], where: str) -> None:
        owners: dict[str, int] = {}
        for i, rule in enumerate(self.exclusive, start=1):
            for j, other in enumerate(self.exclusive[: i - 1], start=1):
                for a in rule.classes:
                    for b in other.classes:
                        if Taxonomy.covers(a, b) or Taxonomy.covers(b, a):
                            raise PolicyError(f"{where}: exclusive rules {j} and {i} overlap in classes ('{b}', '{a}')")
            for name in parameter_names:
                if any(matches(p, name) for p in self._expand(rule)):
                    if name in owners:
                        raise PolicyError(
                            f"{where}: exclusive rules {owners[name]} and {i} both claim parameter '{name}'"
                        )
                    owners[name] = i

    # ------------------------------------------------------------------ decisions

    def exclusive_parameters(self, parameter_names: Sequence[str]) -> list[set[str]]:
        return [
            {n for n in parameter_names if any(matches(p, n) for p in self._expand(rule))} for rule in self.exclusive
        ]

    def expanded_rules(self) -> list[Rule]:
        return [Rule(r.classes, tuple(self._expand(r)), r.action, r.phase, r.name) for r in self.rules]


def _names(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: '{key}' must be a non-empty list of names")
    return tuple(value)


def _rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: must be a mapping with classes, params and action")
    unknown = set(entry) - {"name", "classes", "params", "action", "phase"}
    if unknown:
        raise PolicyError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    action = entry.get("action")
    if action not in ("allow", "deny"):
        raise PolicyError(f"{where}: 'action' must be allow or deny, got {action!r}")
    return Rule(
        classes=_names(entry.get("classes"), "classes", where),
        params=_names(entry.get("params"), "params", where),
        action=action,
        phase=parse_phase(entry.get("phase"), where),
        name=str(entry.get("name", "")),
    )


def _exclusive(entry: Any, where: str) -> ExclusiveRule:
    if not isinstance(entry, dict):
        raise PolicyError(f"{where}: must be a mapping with classes and params")
    unknown = set(entry) - {"classes", "params"}
    if unknown:
        raise PolicyError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    classes = _names(entry.get("classes"), "classes", where)
    if "*" in classes:
        raise PolicyError(f"{where}: an exclusive rule names classes, not '*'")
    return ExclusiveRule(classes=classes, params=_names(entry.get("params"), "params", where))


def leaf_classes(names: list[str]) -> list[str]:
    """The classes examples can carry (the taxonomy's leaves), in the taxonomy's order: the columns of every view
    of what a policy allowed (``smalti policy check``, the audit report), so their groups are numbered alike."""
    return [c for c in names if not any(other.startswith(c + "/") for other in names)]


def group_label(members: list[str], width: int = 30) -> str:
    """A group of classes by their last names (``docs, tickets``), or by their number where that is too long."""
    short = ", ".join(m.rsplit("/", 1)[-1] for m in members)
    return short if len(short) <= width else f"{len(members)} classes"
