"""FSDP2 under real torchrun with gloo processes on CPU: training, sharded checkpoints (DCP), routing, the
ledger and deletion, each against one process or an independent run."""

import os
import subprocess
import sys

import pytest
import torch

from smalti.build import build_data
from smalti.checkpoint import CheckpointStore, load_checkpoint
from smalti.distributed import DistInfo
from smalti.trainer import Trainer

from conftest import REPO, free_port, smalti_cli, tiny_recipe, write_policy, write_recipe
from helpers import assert_tree_equal, latest_payload, losses, recipe
from test_distributed import RecordSamples, torchrun

pytestmark = pytest.mark.slow

FSDP = {"parallelism": "fsdp"}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return latest_payload(run_dir)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def test_fsdp_at_2_and_4_ranks_matches_one_process(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "12ba", "global_batch_size": 8, "microbatch_size": 1,
                                             "device": "cpu"}, checkpoint={"interval": "6ba"})
    single = write_recipe(tmp_path / "single.yaml", config)
    sharded = write_recipe(tmp_path / "fsdp.yaml", tiny_recipe(tiny_corpus, **{**config, "train": {**config["train"], **FSDP}}))
    assert smalti_cli("train", str(single), "--run-dir", str(tmp_path / "single")).returncode == 0
    for ranks in (2, 4):
        done = torchrun(ranks, "train", str(sharded), "--run-dir", str(tmp_path / f"fsdp{ranks}"))
        assert done.returncode == 0, done.stderr[-3000:]
        one, many = losses(tmp_path / "single"), losses(tmp_path / f"fsdp{ranks}")
        assert [b for b, _ in one] == [b for b, _ in many] == list(range(1, 13))
        worst = max(abs(a - b) for (_, a), (_, b) in zip(one, many))
        assert worst < 1e-4, f"{ranks} ranks: loss curves differ by {worst}"
        checkpoint = CheckpointStore(tmp_path / f"fsdp{ranks}" / "checkpoints", keep=2).latest()
        assert checkpoint.name == "ep0-ba12.dcp" and checkpoint.is_dir()
        assert sorted(p.name for p in checkpoint.glob("__*.distcp")) == [f"__{r}_0.distcp" for r in range(ranks)]
        assert max_difference(final_weights(tmp_path / "single"), final_weights(tmp_path / f"fsdp{ranks}")) < 2e-5


def probe(ranks: int, config_path, run_dir, perturbed: str = "-") -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(REPO / "tests" / "fsdp_probe.py"), str(config_path), str(run_dir),
               perturbed]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(run_dir / f"shards{r}.pt") for r in range(ranks)]


MACBETH = "gutenberg/tragedy/macbeth"


def governed_fsdp(governed, tmp_path, **train):
    policy = write_policy(governed, tmp_path / "policy.yaml", [
        {"classes": [MACBETH], "params": ["tok_emb", "blocks.0"], "action": "deny"},
        {"classes": ["*"], "params": ["blocks.1.mlp"], "action": "deny", "phase": "6ba..1000ba"},
    ])
    ledger = {"enabled": True, "key": str(governed.key("trainer"))}
    return governed.recipe(governance={"policy": str(policy), "ledger": ledger}, data={"batching": "random"},
                           train={"max_duration": "10ba", "microbatch_size": 2, **train},
                           checkpoint={"interval": "5ba"})


def test_g1_under_fsdp_forbidden_shards_do_not_feel_the_forbidden_class(governed, tmp_path):
    # One step: G1 is about a step's update (later steps start from weights the class shaped elsewhere).
    config = governed_fsdp(governed, tmp_path, **FSDP, max_duration="1ba")
    data = build_data(recipe(config), DistInfo())
    first = data.train.gather(data.sampler.global_batch(0, 0))
    assert data.class_names.index(MACBETH) in first.provenance[:, 0].tolist()  # else the test proves nothing
    path = write_recipe(tmp_path / "recipe.yaml", config)
    plain = probe(2, path, tmp_path / "plain")
    perturbed = probe(2, path, tmp_path / "perturbed", MACBETH)
    forbidden = [n for n in plain[0] if n.startswith(("tok_emb", "blocks.0."))]
    for rank in range(2):
        assert_tree_equal({n: plain[rank][n] for n in forbidden}, {n: perturbed[rank][n] for n in forbidden},
                          f"rank {rank}'s forbidden shards")
    moved = "blocks.1.attn.qkv.weight"
    assert not torch.equal(plain[0][moved]["value"], perturbed[0][moved]["value"]), \
        "an allowed parameter should feel the perturbation (else the test proves nothing)"


def close_numbers(a, b, path=""):
    """Equal structure and strings; numbers within 1e-4 relative (1e-6 absolute)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            if key not in ("timestamp", "time", "seconds"):
                close_numbers(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            close_numbers(x, y, f"{path}[{k}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-6 + 1e-4 * abs(a), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_routing_and_the_ledger_under_fsdp_match_one_process(governed, tmp_path):
    from smalti.workflows.certificate import ledger_entries

    single = write_recipe(tmp_path / "single.yaml", governed_fsdp(governed, tmp_path))
    sharded = write_recipe(tmp_path / "fsdp.yaml", governed_fsdp(governed, tmp_path, **FSDP))
    assert smalti_cli("train", str(single), "--run-dir", str(tmp_path / "single")).returncode == 0
    shards = probe(2, sharded, tmp_path / "fsdp")
    reference = final_weights(tmp_path / "single")
    consolidated = final_weights(tmp_path / "fsdp")
    assert max_difference(reference, consolidated) < 2e-5
    for name, value in consolidated.items():  # the ranks hold the pieces of what the checkpoint holds
        if name not in shards[0]:
            assert name == "head.weight" and torch.equal(value, consolidated["tok_emb.weight"])  # tied
            continue
        assert torch.equal(torch.cat([shards[r][name]["value"] for r in range(2)]), value), name
    frozen = [n for n in reference if n.startswith("blocks.1.mlp.")]
    assert all(shards[0][n]["state"]["step"] == 6 for n in frozen)  # denied to every class from batch index 6 on
    _, one, _ = ledger_entries(tmp_path / "single")
    _, two, _ = ledger_entries(tmp_path / "fsdp")
    assert len(one) == len(two) == 10
    for a, b in zip(one, two):
        close_numbers(a, b, f"step {a.get('step')}")
    verify = smalti_cli("ledger", "verify", str(tmp_path / "fsdp"), "--deep")
    assert verify.returncode == 0, verify.stderr


LEG_AT_ONE = """
import sys
import torch
sys.path.insert(0, "tests")
from smalti.config import load_recipe
from smalti.trainer import Trainer
from test_distributed import RecordSamples

def whole(model):
    return {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for n, v in model.state_dict().items()}

samples = RecordSamples()
trainer = Trainer(load_recipe(sys.argv[1]), sys.argv[2], callbacks=[samples])
try:
    start = whole(trainer.model)
    trainer.fit()
    torch.save({"resumed_from": trainer.resumed_from.batch, "start": start, "final": whole(trainer.model),
                "samples": samples.ids}, sys.argv[3])
finally:
    trainer.close()
"""


def test_a_checkpoint_sharded_by_4_ranks_resumes_on_2_then_on_1(tiny_corpus, tmp_path):
    # A constant learning rate, so that stopping a leg early does not change its schedule.
    config = tiny_recipe(tiny_corpus, train={"max_duration": "12ba", "global_batch_size": 8, "device": "cpu", **FSDP},
                         scheduler={"name": "constant", "warmup": "0ba"}, checkpoint={"interval": "3ba", "keep": 2})
    path = write_recipe(tmp_path / "recipe.yaml", config)
    reference = RecordSamples()
    plain = dict(config, train={**config["train"], "parallelism": "ddp"})
    Trainer(recipe(plain), tmp_path / "reference", callbacks=[reference]).fit()

    run = tmp_path / "run"
    for ranks, until in ((4, "6ba"), (2, "9ba")):
        done = torchrun(ranks, "train", str(path), "--run-dir", str(run), "--set", f"train.max_duration={until}")
        assert done.returncode == 0, done.stderr[-3000:]
    store = CheckpointStore(run / "checkpoints", keep=2)
    assert store.latest().name == "ep0-ba9.dcp"
    for name, ranks in (("ep0-ba6.dcp", 4), ("ep0-ba9.dcp", 2)):  # each leg's ranks wrote a shard each
        assert sorted(p.name for p in (run / "checkpoints" / name).glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(ranks)]
    saved = load_checkpoint(store.latest())["model"]

    # One process: FSDP2 on a one-rank group, in a process of its own (gloo's threads must not outlive it in
    # pytest's process, which later tests fork).
    script = tmp_path / "leg_at_one.py"
    script.write_text(LEG_AT_ONE)
    done = subprocess.run([sys.executable, str(script), str(path), str(run), str(tmp_path / "leg.pt")], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    leg = torch.load(tmp_path / "leg.pt")
    assert leg["resumed_from"] == 9
    assert_tree_equal(leg["start"], saved, "weights resumed at world size 1")
    resumed, final = leg["samples"], leg["final"]
    assert sorted(resumed) == [10, 11, 12]
    for step, ids in resumed.items():
        assert torch.equal(ids, reference.ids[step]), step
    a, b = losses(tmp_path / "reference"), losses(run)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4
    assert max_difference(final, latest_payload(tmp_path / "reference")["model"]) < 2e-5


KILL_IN_SHARDED_SAVE = """
import os, signal, sys
import torch.distributed.checkpoint as dcp

calls = 0
real_save = dcp.save

def save_or_die(state, checkpoint_id=None, **kwargs):
    global calls
    calls += 1
    if calls == 2 and os.environ["RANK"] == "1":  # rank 0 is writing its shards of the second checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

dcp.save = save_or_die
from smalti.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_and_async_saves_equal_sync_ones(
        tiny_corpus, tmp_path):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "9ba", "global_batch_size": 8, "device": "cpu", **FSDP},
                         checkpoint={"interval": "3ba", "keep": 3})
    path = write_recipe(tmp_path / "recipe.yaml", config)
    done = torchrun(2, "train", str(path), "--run-dir", str(tmp_path / "reference"))
    assert done.returncode == 0, done.stderr[-3000:]

    # Written in the background while training goes on, each checkpoint still holds its own step's state.
    done = torchrun(2, "train", str(path), "--run-dir", str(tmp_path / "async"), "--set", "checkpoint.async_save=true")
    assert done.returncode == 0, done.stderr[-3000:]
    written = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in written.glob("*.dcp")) == ["ep0-ba3.dcp", "ep0-ba6.dcp", "ep0-ba9.dcp"]
    assert (written / "latest").read_text().strip() == "ep0-ba9.dcp" and not list(written.glob(".*.tmp"))
    for name in ("ep0-ba3.dcp", "ep0-ba6.dcp", "ep0-ba9.dcp"):
        ours, theirs = load_checkpoint(written / name), load_checkpoint(tmp_path / "reference" / "checkpoints" / name)
        assert_tree_equal(ours["model"], theirs["model"], f"{name} weights, async vs sync")
        assert_tree_equal(ours["optimizer"]["state"], theirs["optimizer"]["state"], f"{name} optimizer, async vs sync")
        assert ours["rng"] == theirs["rng"] and ours["timestamp"] == theirs["timestamp"]
    refused = smalti_cli("train", str(path), "--run-dir", str(tmp_path / "ddp"), "--set", "train.parallelism=ddp",
                         "--set", "checkpoint.async_save=true")
    assert refused.returncode != 0 and "checkpoint.async_save" in refused.stderr and "fsdp" in refused.stderr

    script = tmp_path / "kill_in_save.py"
    script.write_text(KILL_IN_SHARDED_SAVE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(script), "train", str(path), "--run-dir", str(tmp_path / "killed")]
    dying = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert dying.returncode != 0
    folder = tmp_path / "killed" / "checkpoints"
    assert (folder / "latest").read_text().strip() == "ep0-ba3.dcp"
    assert not (folder / "ep0-ba6.dcp").exists() and list(folder.glob(".ep0-ba6.dcp.tmp"))
    assert load_checkpoint(folder / "ep0-ba3.dcp")["timestamp"]["batch"] == 3

    again = torchrun(2, "train", str(path), "--run-dir", str(tmp_path / "killed"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(folder.glob(".*.tmp"))
    assert_tree_equal(latest_payload(tmp_path / "killed")["model"], latest_payload(tmp_path / "reference")["model"],
                      "weights after the kill and the rerun")
    assert losses(tmp_path / "killed")[-3:] == losses(tmp_path / "reference")[-3:]


def test_a_hugging_face_llama_under_fsdp_with_bf16_parameters(governed, tmp_path):
    from smalti.fsdp import transformer_blocks
    from smalti.build import build_model_for
    from test_hf_models import hf_model

    config = governed.recipe(model=hf_model("llama"), train={"max_duration": "8ba", "microbatch_size": 2},
                             checkpoint={"interval": "4ba"})
    data = build_data(recipe(config), DistInfo())
    blocks = transformer_blocks(build_model_for(recipe(config), data))
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2  # from the model's _no_split_modules
    single = write_recipe(tmp_path / "single.yaml", config)
    assert smalti_cli("train", str(single), "--run-dir", str(tmp_path / "single")).returncode == 0
    for name, fsdp in (("fp32", FSDP), ("bf16", {**FSDP, "fsdp": {"param_dtype": "bf16"}})):
        sharded = write_recipe(tmp_path / f"{name}.yaml", dict(config, train={**config["train"], **fsdp}))
        done = torchrun(2, "train", str(sharded), "--run-dir", str(tmp_path / name))
        assert done.returncode == 0, done.stderr[-3000:]
        one, two = losses(tmp_path / "single"), losses(tmp_path / name)
        worst = max(abs(a - b) for (_, a), (_, b) in zip(one, two))
        assert worst < (1e-4 if name == "fp32" else 5e-2), f"{name}: loss curves differ by {worst}"
        weights = final_weights(tmp_path / name)
        assert all(v.dtype == torch.float32 for v in weights.values())  # bf16 only while computing
        if name == "fp32":
            assert max_difference(final_weights(tmp_path / "single"), weights) < 2e-5


def test_per_class_lora_adapters_with_the_ledger_under_fsdp(governed, tmp_path):
    from test_hf_models import HAMLET, hf_model

    ledger = {"enabled": True, "key": str(governed.key("trainer"))}
    config = governed.recipe(model=hf_model("llama", classes=[HAMLET], freeze_base=False),
                             governance={"ledger": ledger}, data={"batching": "random"},
                             train={"max_duration": "6ba", "microbatch_size": 2}, checkpoint={"interval": "3ba"})
    single = write_recipe(tmp_path / "single.yaml", config)
    assert smalti_cli("train", str(single), "--run-dir", str(tmp_path / "single")).returncode == 0
    sharded = write_recipe(tmp_path / "fsdp.yaml", dict(config, train={**config["train"], **FSDP}))
    done = torchrun(2, "train", str(sharded), "--run-dir", str(tmp_path / "fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    weights = final_weights(tmp_path / "fsdp")
    assert any(".lora_" in name for name in weights)
    assert max_difference(final_weights(tmp_path / "single"), weights) < 2e-5


def test_exact_forget_of_an_fsdp_run_equals_the_counterfactual_fsdp_run_bitwise(governed, tmp_path):
    import json

    from test_deletion import late_config
    from test_ledger import TEMPEST, entries

    config, late = late_config(governed)
    config = dict(config, train={**config["train"], **FSDP}, model={**config["model"], "dropout": 0.1})  # as users run
    parent = write_recipe(tmp_path / "parent.yaml", config)
    done = torchrun(2, "train", str(parent), "--run-dir", str(tmp_path / "parent"))
    assert done.returncode == 0, done.stderr[-3000:]

    # In one process the replay would add the ranks' gradients in another order: refused, nothing written.
    refused = smalti_cli("forget", str(tmp_path / "parent"), "--class", TEMPEST, "--out", str(tmp_path / "one"))
    assert refused.returncode != 0 and "torchrun --nproc-per-node 2" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "one").exists()

    done = torchrun(2, "forget", str(tmp_path / "parent"), "--class", TEMPEST, "--out", str(tmp_path / "forgot"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("steps replayed: 5 of") == 1  # rank 0 reports; the other rank trained quietly
    counterfactual = write_recipe(tmp_path / "counterfactual.yaml",
                                  dict(config, data={**config["data"], "exclude_classes": [TEMPEST]}))
    done = torchrun(2, "train", str(counterfactual), "--run-dir", str(tmp_path / "counterfactual"))
    assert done.returncode == 0, done.stderr[-3000:]

    forgotten = CheckpointStore(tmp_path / "forgot" / "checkpoints", keep=1).latest()
    assert forgotten.is_dir() and forgotten.name.endswith(".dcp")
    assert_tree_equal(final_weights(tmp_path / "forgot"), final_weights(tmp_path / "counterfactual"),
                      "forgotten vs counterfactual")
    assert not torch.equal(final_weights(tmp_path / "forgot")["tok_emb.weight"],
                           final_weights(tmp_path / "parent")["tok_emb.weight"])
    replayed, reference = entries(tmp_path / "forgot"), entries(tmp_path / "counterfactual")
    assert [e["step"] for e in replayed[1:]] == list(range(late + 1, late + 6))
    assert replayed[1:] == [e for e in reference[1:] if e["step"] > late]  # field for field
    verified = smalti_cli("ledger", "verify", str(tmp_path / "forgot"))
    assert verified.returncode == 0, verified.stderr
    certificate = json.loads((tmp_path / "forgot" / "deletion-certificate.json").read_text())
    fork = tmp_path / "parent" / "checkpoints" / certificate["checkpoint"]["name"]
    assert certificate["world_size"] == 2 and fork.name == f"ep0-ba{late}.dcp"
    assert certificate["checkpoint"]["sha256"] == (fork.parent / f"{fork.name}.sha256").read_text().split()[0]


def test_ablation_of_an_fsdp_run_stays_sharded_and_a_fine_tune_starts_from_it(governed, tmp_path):
    from smalti.checkpoint import weights_sha256
    from test_ledger import HAMLET, entries, ledger_recipe

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    config = ledger_recipe(governed, governance={"policy": str(policy)},
                           model={"adapters": {"classes": [HAMLET], "hidden": 8}},
                           train={"max_duration": "6ba", "microbatch_size": 2, **FSDP}, data={"batching": "per_class"},
                           checkpoint={"interval": "3ba"})
    done = torchrun(2, "train", str(write_recipe(tmp_path / "parent.yaml", config)), "--run-dir", str(tmp_path / "parent"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = smalti_cli("forget", str(tmp_path / "parent"), "--class", HAMLET, "--mode", "ablate", "--reset", "zero",
                      "--out", str(tmp_path / "ablated"))
    assert done.returncode == 0, done.stderr
    ablated = CheckpointStore(tmp_path / "ablated" / "checkpoints", keep=1).latest()
    assert ablated.is_dir() and ablated.name == "ep0-ba6.dcp"
    before, after = latest_payload(tmp_path / "parent"), latest_payload(tmp_path / "ablated")
    confined = {n for n in after["model"] if "adapter" in n}
    assert confined
    for name, value in after["model"].items():
        if name in confined:
            assert torch.count_nonzero(value) == 0 and torch.count_nonzero(before["model"][name]) > 0, name
        else:
            assert torch.equal(value, before["model"][name]), name  # every other parameter bitwise unchanged
    for name, state in after["optimizer"]["state"].items():
        moments = [v for k, v in state.items() if k != "step"]
        assert all((torch.count_nonzero(v) == 0) == (name in confined) for v in moments), name
    verified = smalti_cli("ledger", "verify", str(tmp_path / "ablated"))
    assert verified.returncode == 0, verified.stderr

    # The ablated model is a parent like any other: a fine-tune at 2 FSDP2 ranks starts from its weights, as
    # the same fine-tune in one process does.
    child = dict(config, train={**config["train"], "max_duration": "2ba"}, init={"from_run": str(tmp_path / "ablated")})
    done = torchrun(2, "train", str(write_recipe(tmp_path / "child.yaml", child)), "--run-dir", str(tmp_path / "child"))
    assert done.returncode == 0, done.stderr[-3000:]
    single = dict(child, train={**child["train"], "parallelism": "ddp"})
    done = smalti_cli("train", str(write_recipe(tmp_path / "single.yaml", single)), "--run-dir", str(tmp_path / "single"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_difference(final_weights(tmp_path / "child"), final_weights(tmp_path / "single")) < 2e-5
    assert entries(tmp_path / "child")[0]["parent"]["start_weights_sha256"] == weights_sha256(after["model"])
