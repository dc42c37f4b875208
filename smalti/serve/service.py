"""The service's state, built once per ``smalti serve``: the runs, who may read, the access log, the limits.

Routes (``smalti.serve.api``) read through it. What the service vouches for and what it only passes on is
set here: a run's trust verdict is the taxonomy's trainer key's, the report is checked against that key, and
paths of this machine never leave it (a parent outside the served folder is shown by its name only).
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar, cast
from urllib.parse import urlsplit

from smalti.errors import SmaltiError
from smalti.trust.keys import SigningKey
from smalti.trust.entry import TreeHead
from smalti.trust.note import verifier_key
from smalti.trust.taxonomy import Taxonomy
from smalti.serve.access_log import AccessLog
from smalti.serve.auth import RefusalThrottle, RequestAuthenticator, Sessions
from smalti.serve.runs import BoundedCache, Limits, NotFound, Runs, Unprocessable
from smalti.io import Closing

T = TypeVar("T")
MAX_LINEAGE = 64


class Busy(SmaltiError):
    """Every slot for heavy work is taken for longer than a reader should wait (503)."""


@dataclass(frozen=True)
class ServeSettings:
    runs_dir: Path
    taxonomy: Taxonomy
    origin: str  # the public origin auditors sign for: https://audit.example (scheme, host, port)
    access_log: Path
    service_key: SigningKey
    limits: Limits = field(default_factory=Limits)
    heavy_slots: int = 2  # whole-ledger scans at once (queries, heatmap builds, entropy)
    report_slots: int = 1  # reports rendered at once
    heavy_wait: float = 30.0  # seconds a request waits for a slot before 503
    proxies: tuple[str, ...] = ()  # reverse proxies whose X-Forwarded-For names the client (the only ones believed)
    body_timeout: float = 10.0  # seconds a sign-in request has to send its body
    public_tiles: bool = False  # tiles and entry bundles readable without a credential (a CDN may cache them)


def normal_address(address: str) -> str:
    """An address as the service counts clients: IPv4 as itself (an IPv4-mapped IPv6 address too), IPv6 by its
    /64; anything else (a name, garbage in a header) as given."""
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def check_origin(origin: str) -> str:
    """``http(s)://host[:port]`` with nothing after it; a one-line error otherwise."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise SmaltiError(
            f"--origin {origin!r}: expected the service's public origin, e.g. https://audit.example "
            f"or http://127.0.0.1:8700"
        )
    return f"{parts.scheme}://{parts.netloc.lower()}"


class Service(Closing):
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.origin = check_origin(settings.origin)
        parts = urlsplit(self.origin)
        default_port = 443 if parts.scheme == "https" else 80
        self.hosts = {parts.netloc} | (
            {cast(str, parts.hostname)}  # check_origin saw a host name
            if (parts.port or default_port) == default_port
            else set()
        )
        self.secure = parts.scheme == "https"
        # One cookie name per origin: cookies ignore ports, and two services on one host must not overwrite each
        # other's session cookie (the header half is per origin anyway).
        tag = hashlib.sha256(self.origin.encode()).hexdigest()[:8]
        self.cookie_name = f"{'__Host-' if self.secure else ''}{Sessions.COOKIE}_{tag}"
        self.runs = Runs(settings.runs_dir, settings.taxonomy, settings.limits)
        self.authenticator = RequestAuthenticator(settings.taxonomy, self.origin)
        self.sessions = Sessions(self.authenticator)
        self.throttle = RefusalThrottle()
        access_origin = f"smalti-access/{parts.netloc}"
        self.access_log = AccessLog(settings.access_log, settings.service_key, access_origin)
        self.proxies = {normal_address(p) for p in settings.proxies}
        self.access_verifier = verifier_key(access_origin, settings.service_key.public.raw)
        self._heavy = threading.BoundedSemaphore(settings.heavy_slots)
        self._answers = BoundedCache(256)  # forensic answers and entropy profiles: small, and dear to recompute
        self._reports = threading.BoundedSemaphore(settings.report_slots)

    def close(self) -> None:
        self.access_log.close()

    def client_address(self, peer: str, headers: list[tuple[str, str]]) -> str:
        """Who is asking, for throttling and the log: the TCP peer, or behind a configured reverse proxy the last
        address that proxy appended to X-Forwarded-For (anything before it the client could have written). An
        IPv6 client counts as its /64, as one host usually holds a whole /64."""
        peer = normal_address(peer)
        if peer in self.proxies:
            forwarded = [v for k, v in headers if k == "x-forwarded-for"]
            last = forwarded[-1].split(",")[-1].strip() if forwarded else ""
            peer = normal_address(last[:64]) or peer
        return peer

    def scrub(self, text: str) -> str:
        """A message for a client, without the paths of this machine that a lower layer quoted."""
        root = str(self.runs.root)
        return text.replace(root + "/", "").replace(root, ".")

    # ---------------------------------------------------------------- bounded work

    def _slot(self, semaphore: threading.BoundedSemaphore, work: Callable[[], T], what: str) -> T:
        if not semaphore.acquire(timeout=self.settings.heavy_wait):
            raise Busy(f"busy: every slot for {what} is taken; try again in a minute")
        try:
            return work()
        finally:
            semaphore.release()

    def heavy(self, work: Callable[[], T]) -> T:
        return self._slot(self._heavy, work, "whole-ledger work")

    def query(self, run: str, question: tuple[Any, ...], ask: Callable[[Any], T]) -> T:
        """A forensic query, streamed over the ledger under one heavy slot; its (small) answer kept per head."""
        head, _ = self.runs.head(run)
        return self._answers.get(
            (run, head.size, head.root, question), lambda: self.heavy(lambda: ask(self.runs.ledger(run, head)))
        )

    def kept_answer(self, run: str, question: tuple[Any, ...]) -> Any | None:
        """A forensic answer already kept for the run's latest head, or None: cheap enough for the event loop."""
        head, _ = self.runs.head(run)
        return self._answers.peek((run, head.size, head.root, question))

    # ---------------------------------------------------------------- runs

    def run_summary(self, name: str) -> dict[str, Any]:
        """One row of the run list: never fails as a whole because one run is broken."""
        try:
            head, recorded = self.runs.head(name)
            trust = self.runs.trust(name, head, recorded).to_json()
            parent = self.runs.run_entry(name, head).get("parent") or {}
            return {
                "run": name,
                "entries": head.size,
                "final": head.final,
                "signed": head.timestamp,
                "origin": head.origin,
                "trust": trust,
                "parent": self.runs.label(parent["run_dir"]) if parent else None,
                "link": parent.get("kind") if parent else None,
                "forgotten": parent.get("forgotten") if parent else None,
            }
        except (NotFound, Unprocessable, SmaltiError) as error:
            return {
                "run": name,
                "entries": 0,
                "final": False,
                "signed": None,
                "origin": None,
                "trust": {"trusted": False, "reason": self.scrub(str(error)), "trainer": None},
                "parent": None,
                "link": None,
                "forgotten": None,
            }

    def lineage(self, run: str) -> list[dict[str, Any]]:
        """The run's ancestors, nearest first, followed only within the served folder (a lookup per ancestor)."""
        found: list[dict[str, Any]]
        found, seen, current = [], {run}, run
        while len(found) < MAX_LINEAGE:
            try:
                head, _ = self.runs.head(current)
            except (NotFound, Unprocessable):
                break
            parent = self.runs.run_entry(current, head).get("parent")
            if not parent:
                break
            label = self.runs.label(parent["run_dir"])
            found.append(
                {
                    "run": label,
                    "kind": parent.get("kind", "replay"),
                    "forgotten": parent.get("forgotten"),
                    "mode": parent.get("mode"),
                    "head_size": (parent.get("head") or {}).get("size"),
                }
            )
            if label in seen or not self.runs.is_run(label):
                break  # outside the folder, not a run here, or a circle
            seen.add(label)
            current = label
        return found

    def tree(self, run: str, head: TreeHead) -> Any:
        """The run's Merkle tree at ``head``, built (a whole-ledger read) under a heavy slot when not kept."""
        return self.runs.tree(run, head, build=self.heavy)

    def entropy(self, run: str, max_profiles: int) -> dict[str, Any]:
        head, _ = self.runs.head(run)
        return self._answers.get(
            (run, head.size, head.root, "entropy", max_profiles),
            lambda: self.heavy(lambda: self._entropy(run, head, max_profiles)),
        )

    def _entropy(self, run: str, head: TreeHead, max_profiles: int) -> dict[str, Any]:
        config = self.runs.run_entry(run, head).get("entropy") or {}
        every = int(config.get("every") or 0)
        measured = (head.size - 1) // every if every > 0 else 0
        keep = max(1, -(-measured // max_profiles)) if measured else 1  # every keep-th profile
        profiles, seen = [], 0
        for body in self.runs.steps(run, head):
            if body.get("entropy") is not None:
                if seen % keep == 0:
                    profiles.append({"step": body["step"], "entropy": body["entropy"]})
                seen += 1
        return {
            "layers": config.get("layers", []),
            "classes": config.get("classes", []),
            "measured": seen,
            "profiles": profiles[:max_profiles],
        }

    def report(self, run: str) -> str:
        """The HTML report, checked against the taxonomy's trainer key (rendered once per head, then kept)."""
        from smalti.governance.ledger.audit import AuditError
        from smalti.trust.entry import EntryFormatError
        from smalti.workflows.report import ServedBy, render_report
        from smalti.governance.ledger.verify import VerifyReport, verify_ledger

        head, recorded = self.runs.head(run)
        trust = self.runs.trust(run, head, recorded)

        def render() -> str:
            path = self.runs.path(run)
            key = self.runs.trainer_key(recorded)
            verified = (
                verify_ledger(path, key, workers=1, in_progress=True, read_only=True)
                if key is not None
                else VerifyReport(ok=False, problem="the taxonomy names no single trainer to check it against")
            )
            served = ServedBy(
                self.runs.label, key, self.settings.limits.max_report_checkpoint_bytes, dict(self.runs.evaluators)
            )
            try:
                page = render_report(
                    path,
                    verified,
                    read_only=True,
                    title=run,
                    untrusted=None if trust.trusted else trust.reason,
                    served=served,
                )
            except (EntryFormatError, AuditError, ValueError, TypeError, OverflowError) as error:
                raise Unprocessable(f"run {run!r}: its ledger cannot be reported ({error})") from None
            return self.scrub(page)  # whatever a message below quoted: no path of this machine leaves it

        return self.runs.reports.get(
            (run, head.size, head.root, head.signature), lambda: self._slot(self._reports, render, "reports")
        )
