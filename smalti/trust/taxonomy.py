"""The taxonomy: provenance classes as a tree, the authorities, and who may tag what.

Format (YAML)::

    taxonomy: shakespeare
    authorities:
      data-governance: {role: data-governance, key: "ed25519:..."}
      gutenberg-tagger: {role: tagging, key: "ed25519:...", may_tag: [gutenberg]}
      model-risk: {role: model-risk, key: "ed25519:..."}
      trainer: {role: trainer, key: "ed25519:..."}
      lab-evals: {role: evaluator, key: "ed25519:..."}     # signs evaluation attestations (smalti evaluate)
    classes:
      gutenberg:
        tragedy:
          hamlet:
          macbeth:
        comedy:
          tempest:
    deletable: [gutenberg/tragedy/hamlet]

A class is named by its path (``gutenberg/tragedy/hamlet``); a node covers its
subtree. The file is signed (``taxonomy.yaml.sig``) by the data-governance
authority, and a verifier pins that authority's public key: a taxonomy signed
by any other key is refused, even one that lists itself as data-governance.
Class indices (used in batches and ledgers) are the depth-first order of the
file, so they are fixed by the signed bytes, and by the class tree alone: the
authorities and their keys do not number anything (``class_tree_fingerprint``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey, read_signature, verify_bytes

ROLES = ("data-governance", "tagging", "model-risk", "trainer", "auditor", "evaluator")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TaxonomyError(SmaltiError):
    """The taxonomy is malformed, unsigned, altered, or does not know a class."""


@dataclass(frozen=True)
class Authority:
    name: str
    role: str
    key: PublicKey | None
    may_tag: tuple[str, ...] = ()


@dataclass
class Taxonomy:
    name: str
    classes: list[str]
    authorities: dict[str, Authority]
    deletable: frozenset[str]
    fingerprint: str
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.classes)}

    # ---------------------------------------------------------------- loading

    @classmethod
    def parse(cls, data: bytes, where: str) -> "Taxonomy":
        """Parse without checking any signature (use ``load`` to verify)."""
        try:
            spec = yaml.safe_load(data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise TaxonomyError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
        if not isinstance(spec, dict):
            raise TaxonomyError(f"{where}: a taxonomy is a mapping with 'taxonomy', 'authorities' and 'classes'")
        unknown = set(spec) - {"taxonomy", "authorities", "classes", "deletable", "allow_shared_keys"}
        if unknown:
            raise TaxonomyError(f"{where}: unknown key '{sorted(unknown)[0]}'")
        name = spec.get("taxonomy")
        if not isinstance(name, str) or not name:
            raise TaxonomyError(f"{where}: 'taxonomy' (its name) is required")
        classes: list[str] = []
        _walk(spec.get("classes"), "", classes, where)
        if not classes:
            raise TaxonomyError(f"{where}: 'classes' defines no class")
        known = set(classes)
        authorities = {}
        for auth_name, entry in (spec.get("authorities") or {}).items():
            authorities[auth_name] = _authority(auth_name, entry, known, where)
        _check_distinct_keys(authorities, spec.get("allow_shared_keys") is True, where)
        if not any(a.role == "data-governance" for a in authorities.values()):
            raise TaxonomyError(f"{where}: no authority has role 'data-governance'")
        deletable = spec.get("deletable") or []
        for item in deletable:
            if item not in known:
                raise TaxonomyError(f"{where}: deletable class '{item}' is not in the taxonomy")
        return cls(
            name=name,
            classes=classes,
            authorities=authorities,
            deletable=frozenset(deletable),
            fingerprint=hashlib.sha256(data).hexdigest(),
        )

    @classmethod
    def load(cls, path: str | Path, trust: PublicKey | None) -> "Taxonomy":
        """Read, verify and parse.

        With ``trust`` (the pinned data-governance public key) this is the
        check training relies on. Without it, the signature is checked against
        the data-governance key the file itself lists: that proves the file was
        not altered after signing, but not who signed it.
        """
        path = Path(path)
        if not path.is_file():
            raise TaxonomyError(f"{path}: taxonomy not found")
        data = path.read_bytes()
        signature = read_signature(path)
        taxonomy = cls.parse(data, str(path))
        governance = [a for a in taxonomy.authorities.values() if a.role == "data-governance" and a.key is not None]
        if trust is not None:
            if signature.key_id != trust.key_id:
                raise TaxonomyError(
                    f"{path}: signed by key {signature.key_id}, not by the trusted data-governance key {trust.key_id}"
                )
            if not any(a.key == trust for a in governance):
                raise TaxonomyError(f"{path}: the trusted key {trust.key_id} is not its data-governance authority")
            key = trust
        else:
            match = [a.key for a in governance if a.key is not None and a.key.key_id == signature.key_id]
            if not match:
                raise TaxonomyError(
                    f"{path}: signed by key {signature.key_id}, which is not its data-governance authority"
                )
            key = match[0]
        verify_bytes(data, signature, key, where=str(path))
        return taxonomy

    # ---------------------------------------------------------------- queries

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise TaxonomyError(f"class '{name}' is not in taxonomy '{self.name}'") from None

    @staticmethod
    def covers(node: str, name: str) -> bool:
        """Whether ``node`` is ``name`` or one of its ancestors."""
        return name == node or name.startswith(node + "/")

    def subtree(self, node: str) -> list[str]:
        self.index(node)
        return [c for c in self.classes if self.covers(node, c)]

    def authority_with_key(self, key_id: str) -> Authority | None:
        return next((a for a in self.authorities.values() if a.key is not None and a.key.key_id == key_id), None)

    def may_tag(self, authority: Authority, name: str) -> bool:
        return authority.role == "tagging" and any(self.covers(node, name) for node in authority.may_tag)

    @property
    def class_tree_fingerprint(self) -> str:
        """The class tree, and so the class numbering, without the authorities: what training may depend on.

        ``fingerprint`` (the signed bytes, keys included) is evidence of who governed a run;
        this is what shapes it, so re-signing or rotating a key never changes a model.
        """
        return hashlib.sha256(json.dumps(self.classes, separators=(",", ":")).encode()).hexdigest()

    def key_of_role(self, role: str) -> PublicKey | None:
        return next((a.key for a in self.authorities.values() if a.role == role and a.key is not None), None)


def unknown_class(option: str, name: str, classes: list[str]) -> str:
    """One line for a class name that names nothing: the closest classes or nodes, never the whole list.

    Candidates are every class and every node above one (a node covers its subtree); a name
    is matched whole and by its last segment, so ``hamlett`` finds ``gutenberg/tragedy/hamlet``.
    """
    nodes = list(
        dict.fromkeys(p for c in classes for p in ("/".join(c.split("/")[: i + 1]) for i in range(c.count("/") + 1)))
    )
    close = difflib.get_close_matches(name, nodes, n=3, cutoff=0.6)
    by_leaf: dict[str, list[str]] = {}
    for node in nodes:
        by_leaf.setdefault(node.rsplit("/", 1)[-1], []).append(node)
    for leaf in difflib.get_close_matches(name.rsplit("/", 1)[-1], list(by_leaf), n=3, cutoff=0.6):
        close += [n for n in by_leaf[leaf] if n not in close]
    hint = f"; did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else ""
    leaf_count = sum(1 for c in classes if not any(other.startswith(c + "/") for other in classes))
    node_count = len(classes) - leaf_count
    counted = f"{leaf_count} class{'es' if leaf_count != 1 else ''}" + (
        f" and {node_count} node{'s' if node_count != 1 else ''}" if node_count else ""
    )
    return f"{option} {name!r}: no class or node of this run's {counted} is called that{hint}"


def _walk(node: Any, prefix: str, out: list[str], where: str) -> None:
    if node is None:
        return
    if not isinstance(node, dict):
        raise TaxonomyError(f"{where}: under '{prefix.rstrip('/') or 'classes'}', expected a mapping of class names")
    for segment, children in node.items():
        segment = str(segment)
        if not _SEGMENT.match(segment):
            raise TaxonomyError(f"{where}: class name '{prefix}{segment}' has characters outside [A-Za-z0-9_.-]")
        path = f"{prefix}{segment}"
        if path in out:
            raise TaxonomyError(f"{where}: class '{path}' defined twice")
        out.append(path)
        _walk(children, f"{path}/", out, where)


def _check_distinct_keys(authorities: dict[str, Authority], allowed: bool, where: str) -> None:
    """One key, one authority: a key named twice would hold both roles, and a reader (the audit service, say)
    could not tell which one signed; a taxonomy that means it says ``allow_shared_keys: true``."""
    seen: dict[str, str] = {}
    for name, authority in authorities.items():
        if authority.key is None:
            continue
        other = seen.setdefault(authority.key.key_id, name)
        if other != name and not allowed:
            raise TaxonomyError(
                f"{where}: authorities '{other}' and '{name}' have the same key "
                f"{authority.key.key_id}; give each its own key (or set allow_shared_keys: true)"
            )


def _authority(name: str, entry: Any, known: set[str], where: str) -> Authority:
    if not isinstance(entry, dict):
        raise TaxonomyError(f"{where}: authority '{name}' must be a mapping with 'role' and 'key'")
    unknown = set(entry) - {"role", "key", "may_tag"}
    if unknown:
        raise TaxonomyError(f"{where}: authority '{name}': unknown key '{sorted(unknown)[0]}'")
    role = entry.get("role")
    if role not in ROLES:
        raise TaxonomyError(f"{where}: authority '{name}': role must be one of {', '.join(ROLES)}, got {role!r}")
    key_text = entry.get("key")
    if key_text is None and role != "auditor":
        raise TaxonomyError(f"{where}: authority '{name}' ({role}) needs a 'key'")
    key = PublicKey.parse(key_text, where=f"{where}: authority '{name}'") if key_text else None
    may_tag = tuple(entry.get("may_tag") or ())
    if may_tag and role != "tagging":
        raise TaxonomyError(f"{where}: authority '{name}' has 'may_tag' but role '{role}' (only 'tagging' tags)")
    for node in may_tag:
        if node not in known:
            raise TaxonomyError(f"{where}: authority '{name}' may tag '{node}', which is not a class")
    return Authority(name=name, role=role, key=key, may_tag=may_tag)


def taxonomy_yaml(name: str, classes: list[str], authorities: dict[str, dict], deletable: Sequence[str] = ()) -> str:
    """Write a taxonomy file from class paths (ancestors are added) and authority entries."""
    tree: dict = {}
    for path in classes:
        node = tree
        for segment in path.split("/"):
            node = node.setdefault(segment, {})

    def nulls(node: dict) -> dict | None:
        return {k: nulls(v) for k, v in node.items()} or None

    document: dict[str, Any] = {"taxonomy": name, "authorities": authorities, "classes": nulls(tree)}
    if deletable:
        document["deletable"] = list(deletable)
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=120)
