"""``smalti forget``: one entry for every deletion. It locks the run directories, decides between a deletion
within one run and one across a lineage (``smalti.workflows.lineage_deletion``), and runs the replay on every
rank under torchrun. The steps themselves (plan, fork, replay, ablate, evaluate, certify) are the public
functions of ``smalti.workflows.deletion``."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smalti import distributed
from smalti.errors import SmaltiError
from smalti.locks import RUN_LOCK
from smalti.trust.keys import SigningKey
from smalti.workflows.certificate import sign_certificate, write_certificate
from smalti.workflows.deletion import (
    DeletionError,
    DeletionPlan,
    ablate,
    base_certificate,
    evaluation,
    final_head,
    fork,
    latest_checkpoint,
    load_payload,
    lock_for_deletion,
    plan_deletion,
    prepare_out,
    replay_certificate,
    require_world_size,
    train_without,
)
from smalti.workflows.lineage_deletion import forget_through_lineage, plan_through_lineage
from smalti.checkpoint import weights_sha256


def forget(
    parent: str | Path,
    node: str,
    out: str | Path,
    key: SigningKey,
    mode: str = "exact",
    reset: str = "initial",
    max_eval_samples: int | None = None,
) -> dict[str, Any]:
    """Forget ``node`` from the run in ``parent`` into the new run directory ``out``; returns the certificate.

    Where an ancestor of ``parent`` learned the class, the deletion crosses the lineage
    (``smalti.workflows.lineage_deletion``). Under torchrun every rank calls this: rank 0 plans,
    prepares ``out`` and certifies, every rank trains the replay (at the parent's world size, so the
    replay is the counterfactual run's arithmetic), and ranks other than 0 return ``{}``."""
    parent, out = Path(parent), Path(out)
    if mode not in ("exact", "ablate"):
        raise DeletionError(f"--mode {mode!r}: choose exact or ablate")
    info = _join_ranks(parent)
    try:
        return _forget(parent, node, out, key, mode, reset, max_eval_samples, info)
    finally:
        distributed.shutdown(info)


def _join_ranks(parent: Path) -> distributed.DistInfo:
    """The process group torchrun set up for this deletion (world size 1 without torchrun)."""
    from smalti.config import load_recipe

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return distributed.DistInfo()
    if not (parent / "recipe.yaml").is_file():
        raise DeletionError(f"{parent}: not a run directory (no recipe.yaml)")
    return distributed.init_distributed(distributed.device_type_for(load_recipe(parent / "recipe.yaml").train.device))


@dataclass
class _Replay:
    """What rank 0 prepared for an exact replay, and needs again to certify it."""

    plan: DeletionPlan
    parent_final: dict[str, Any]
    parent_payload: dict[str, Any]
    fork_head: dict[str, Any]
    fork_hash: str | None


def _forget(
    parent: Path,
    node: str,
    out: Path,
    key: SigningKey,
    mode: str,
    reset: str,
    max_eval_samples: int | None,
    info: distributed.DistInfo,
) -> dict[str, Any]:
    created = not out.exists()
    try:
        with contextlib.ExitStack() as locks:
            return _forget_locked(parent, node, out, key, mode, reset, max_eval_samples, info, locks)
    except BaseException:
        if (
            info.is_main and created and out.is_dir() and [p.name for p in out.iterdir()] == [RUN_LOCK]
        ):  # refused: nothing
            (out / RUN_LOCK).unlink()
            out.rmdir()
        raise


def _forget_locked(
    parent: Path,
    node: str,
    out: Path,
    key: SigningKey,
    mode: str,
    reset: str,
    max_eval_samples: int | None,
    info: distributed.DistInfo,
    locks: contextlib.ExitStack,
) -> dict[str, Any]:
    done: dict[str, Any] | _Replay | None = None
    failure: SmaltiError | None = None
    if info.is_main:
        try:
            lock_for_deletion(locks, parent, node, out)
            done = _decide(parent, node, out, key, mode, reset, max_eval_samples, info.world_size)
        except SmaltiError as error:
            failure = error
    # The other ranks learn whether to train (and stop quietly where rank 0 refused: it says why, once).
    replays = distributed.broadcast_object(None if failure else isinstance(done, _Replay), info)
    if failure is not None:
        raise failure
    if replays is None:
        raise SystemExit(1)
    if replays:
        train_without(parent, node, out)
    if not info.is_main:
        return {}
    if isinstance(done, _Replay):
        certificate, final = replay_certificate(done.plan, out, done.fork_head, done.fork_hash)
        certificate["evaluation"] = evaluation(parent, [done.parent_payload, final], max_eval_samples)
        write_certificate(out, sign_certificate(certificate, key))
        return certificate
    assert done is not None
    return done


def _decide(
    parent: Path,
    node: str,
    out: Path,
    key: SigningKey,
    mode: str,
    reset: str,
    max_eval_samples: int | None,
    world_size: int,
) -> dict[str, Any] | _Replay:
    """Rank 0's part: plan, check, and either finish the deletion (ablation, a class that never
    contributed, a lineage) and return its certificate, or prepare ``out`` for the replay."""
    through = plan_through_lineage(parent, node)
    if through is not None:
        if world_size > 1:
            raise DeletionError(
                f"{node!r} was learned by an ancestor of {parent}; a deletion across a lineage runs "
                "in one process: run smalti forget without torchrun"
            )
        return forget_through_lineage(through, out, key, mode, reset, max_eval_samples)
    plan = plan_deletion(parent, node)
    parent_final = final_head(parent)
    if key.public.key_id != parent_final["key_id"]:
        raise DeletionError(
            f"the signing key {key.public.key_id} is not the parent run's trainer key {parent_final['key_id']}"
        )
    parent_payload = load_payload(latest_checkpoint(parent))
    if mode == "exact" and plan.first_step is not None:
        require_world_size(parent, parent_payload, world_size)
        prepare_out(out)
        fork_head, fork_hash = fork(plan, out, parent_final)
        return _Replay(plan, parent_final, parent_payload, fork_head, fork_hash)
    if mode == "ablate":
        if not plan.confined:
            raise DeletionError(f"cannot ablate {node!r}: {plan.ablation}; use --mode exact")
        prepare_out(out)
        certificate, final = ablate(plan, out, key, reset, parent_final), load_payload(latest_checkpoint(out))
    else:
        prepare_out(out)
        certificate = base_certificate(plan, "noop", parent_final)
        certificate.update(
            steps_replayed=0,
            final_weights_sha256=weights_sha256(parent_payload["model"]),
            note=f"{node} never contributed to a step of this run: nothing to forget; the parent's weights stand",
        )
        final = parent_payload
    certificate["evaluation"] = evaluation(parent, [parent_payload, final], max_eval_samples)
    write_certificate(out, sign_certificate(certificate, key))
    return certificate
