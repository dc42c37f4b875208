"""The benchmark scripts run, print one JSON line, and the quality claim holds on a short run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def shared_benchmark_data(tmp_path_factory):
    """The benchmarks' prepared Shakespeare datasets, made once for this file (``common.governed_shakespeare``)."""
    cache = tmp_path_factory.mktemp("benchmark-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMALTI_BENCH_DATA_CACHE", str(cache))
        yield cache


def test_the_shared_data_is_made_once_and_reused_read_only(shared_benchmark_data, tmp_path):
    code = ("import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; "
            "from common import governed_shakespeare; "
            "print(governed_shakespeare(Path(sys.argv[1]), shard_examples=500).dataset)")
    made = [subprocess.run([sys.executable, "-c", code, str(tmp_path / f"root{i}")], capture_output=True, text=True,
                           cwd=REPO, timeout=300) for i in range(2)]
    assert all(m.returncode == 0 for m in made), made[0].stderr[-2000:]
    first, second = (Path(m.stdout.strip()) for m in made)
    assert first == second and first.parent.parent == shared_benchmark_data and (first / "manifest.json").is_file()
    assert not (tmp_path / "root0").exists() and not (tmp_path / "root1").exists()  # nothing made twice


def _run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0])


def test_trainer_overhead_reports_a_ratio():
    result = _run("trainer_overhead.py", "--steps", "6", "--runs", "2")
    assert result["benchmark"] == "trainer_overhead" and result["ratio"] > 0
    assert len(result["per_run_ratios"]) == 2


def test_trainer_matches_handwritten_loop_bitwise():
    result = _run("shakespeare_quality.py", "--steps", "25")
    assert result["max_abs_loss_diff"] == 0.0


def test_data_throughput_reports_ratios():
    result = _run("data_throughput.py", "--passes", "1")
    assert result["benchmark"] == "data_throughput"
    assert result["ratio"] > 0 and result["ratio_batch64"] > 0 and result["verify_seconds_per_gb"] > 0
    assert result["samples_per_pass"] > 70_000


def test_moe_governance_overhead_reports_a_ratio():
    result = _run("moe_governance_overhead.py", "--steps", "3", "--runs", "1", "--batch", "4")
    assert result["benchmark"] == "moe_governance_overhead" and result["ratio"] > 0
    assert result["parameters"] > 3_000_000 and result["tokens_per_step"] == 4 * 256
    assert result["model"]["num_local_experts"] == 8 and result["step_ms"]["governed"] > 0


def test_optimizer_matrix_reports_a_ratio_per_optimizer():
    result = _run("optimizer_matrix.py", "--steps", "4", "--runs", "1", "--optimizers", "adafactor,muon")
    assert result["benchmark"] == "optimizer_matrix" and set(result["step_ms"]) == {"adafactor", "muon"}
    assert result["ratio_adafactor"] > 0 and result["ratio_muon"] > 0 and "ratio_adamw" not in result
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks" / "optimizer_matrix.py"), "--optimizers", "lamb"],
                             capture_output=True, text=True, cwd=REPO / "benchmarks")
    assert refused.returncode == 2 and "'lamb' is not one of" in refused.stderr


def test_routing_overhead_reports_both_ratios():
    result = _run("routing_overhead.py", "--steps", "6", "--runs", "1")
    assert result["benchmark"] == "routing_overhead" and result["ratio"] > 0 and result["ratio_mixed"] > 0
    assert result["routing_signatures_per_mixed_batch"] > 1.5


def test_ledger_overhead_reports_a_ratio():
    """A 1-layer, 32-wide model keeps the smoke test short and checks the model-size options reach the run."""
    result = _run("ledger_overhead.py", "--steps", "6", "--runs", "1", "--n-layer", "1", "--n-head", "2",
                  "--d-model", "32", "--block-size", "16", "--device", "cpu", "--parts")
    assert result["benchmark"] == "ledger_overhead" and result["ratio"] > 0 and result["ledger_bytes_per_step"] > 0
    assert set(result["parts"]) == {"routing", "statistics_no_entropy", "statistics"}
    assert min(result["parts"].values()) > 0
    assert result["model"] == {"n_layer": 1, "n_head": 2, "d_model": 32, "block_size": 16}
    assert result["device"] == "cpu" and result["ratio_large_batch"] > 0 and result["large_batch"] == 48


def test_ledger_verify_reports_entries_per_second():
    result = _run("ledger_verify.py", "--entries", "9000", "--runs", "1", "--workers", "2")  # two spans
    assert result["benchmark"] == "ledger_verify" and result["entries_per_s"] > 0 and result["entries"] == 9000
    assert result["workers"] == 2 and result["one_process_entries_per_s"] > 0


def test_deletion_cost_reports_a_ratio_and_bitwise_equality():
    result = _run("deletion_cost.py", "--runs", "1", "--eval-samples", "24", "--batch-size", "96", "--tiny")
    assert result["benchmark"] == "deletion_cost" and result["ratio"] > 0 and result["bitwise_equal"] is True
    assert result["class_enters_at_step"] > 0.7 * result["steps"]


def test_time_to_quality_gpt_reports_a_speedup():
    result = _run("time_to_quality_gpt.py", "--steps", "24", "--seeds", "1", "--budgets", "1.0",
                  "--eval-every", "8", "--eval-samples", "32")
    assert result["benchmark"] == "time_to_quality_gpt" and len(result["target_eval_loss"]) == 1
    assert result["seconds_to_target"]["baseline"][0] > 0  # the baseline reaches its own final loss


def test_time_to_quality_vision_reports_speedups_per_stack():
    result = _run("time_to_quality_vision.py", "--seeds", "1", "--epochs", "1", "--budgets", "1.0",
                  "--stacks", "digits,digits-mild", "--target", "0.05")
    assert result["benchmark"] == "time_to_quality_vision" and result["speedup_by_stack"]["digits-mild"] > 0


def test_algorithm_pareto_writes_its_table(tmp_path):
    table = tmp_path / "table.md"
    result = _run("algorithm_pareto.py", "--only", "label_smoothing", "--epochs", "0.5", "--steps", "8",
                  "--baseline-runs", "1", "--markdown", str(table))
    methods = {(r["task"], r["method"]) for r in result["rows"]}
    assert {("vision", "baseline"), ("vision", "label_smoothing"), ("text", "label_smoothing")} <= methods
    assert "| vision | label_smoothing |" in table.read_text()


def test_deletion_tradeoff_reports_both_orders():
    result = _run("deletion_tradeoff.py", "--eval-samples", "48", "--batch-size", "96", "--tiny")
    late, shuffled = result["late"], result["shuffled"]
    assert result["benchmark"] == "deletion_tradeoff" and late["first_step_of_class"] > shuffled["first_step_of_class"]
    assert late["steps_to_replay"] < shuffled["steps_to_replay"] and 0 < result["ratio"] < 1


def test_twin_steps_times_each_step_of_both_trainers_on_the_same_batches(tmp_path):
    """The pairing the overhead benchmarks use: one timed twin step per measured step, on the same batches
    (two trainers with the same recipe end with the same weights, bitwise)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import TwinSteps, baby_recipe

    from smalti.trainer import Trainer

    recipe = baby_recipe(4, batch_size=4, model={"n_layer": 1, "n_head": 2, "d_model": 32, "block_size": 32},
                         logging={"console": False, "jsonl": False})
    measured, twin = Trainer(recipe, tmp_path / "measured"), Trainer(recipe, tmp_path / "twin")
    pairs = TwinSteps(measured, twin)
    measured.fit()
    measured.close()
    twin.close()
    assert len(pairs.measured) == len(pairs.twin) == 4 and min(pairs.measured + pairs.twin) > 0
    assert twin.state.timestamp.batch == 4
    for (name, a), b in zip(measured.model.named_parameters(), twin.model.parameters()):
        assert torch.equal(a, b), name


def test_noisy_neighbour_reports_both_policies():
    result = _run("noisy_neighbour.py", "--steps", "5", "--rounds", "1")
    assert result["benchmark"] == "noisy_neighbour" and result["ratio"] > 0 and result["baseline_ratio"] > 0
    assert result["quiet_cost"] > 0 and result["passive_quiet_cost"] > 0 and set(result["step_ms_median"]) == {"smalti", "torch"}
    assert result["smalti_chose"]["beside"] == ["PASSIVE"]  # it saw the neighbour
    assert all(v > 0 for policy in result["step_ms_median"].values() for v in policy.values())


def test_hf_trainer_overhead_reports_a_ratio_and_the_same_losses():
    result = _run("hf_trainer_overhead.py", "--steps", "3", "--runs", "1", "--batch", "4")
    assert result["benchmark"] == "hf_trainer_overhead" and result["ratio"] > 0
    assert result["same_losses_bitwise"] is True and result["tokens_per_step"] == 4 * 256


def test_hf_governance_overhead_reports_both_ratios():
    result = _run("hf_governance_overhead.py", "--steps", "3", "--runs", "1", "--batch", "4")
    assert result["benchmark"] == "hf_governance_overhead" and result["tokens_per_step"] == 4 * 256
    assert result["ratio"] > 0 and result["ratio_lora_mixed"] > 0 and result["lora_adapters"] == 4


def test_elastic_recovery_reports_recovery_time_and_steps_lost():
    result = _run("elastic_recovery.py", "--kills", "1", "--checkpoint-every", "10")
    assert result["benchmark"] == "elastic_recovery" and 0 < result["recovery_s"] < 120
    assert 0 <= result["steps_lost"] <= 10 and len(result["per_kill_recovery_s"]) == 1


def test_fsdp_overhead_reports_the_ratio_to_ddp():
    result = _run("fsdp_overhead.py", "--steps", "6", "--warmup", "1", "--repeats", "1")
    assert result["benchmark"] == "fsdp_overhead" and result["ratio"] > 0 and result["governed_ratio"] > 0
    assert set(result["step_ms"]) == {"ddp", "fsdp", "ddp+ledger", "fsdp+ledger"}


def test_serve_load_reports_latency_and_errors():
    result = _run("serve_load.py", "--clients", "1,3", "--seconds", "1", "--steps", "10")
    assert result["benchmark"] == "serve_load" and result["errors"] == 0 and result["p99_ms"] > 0
    assert result["proofs_per_s_200"] > 0
    assert {(c["kind"], c["clients"]) for c in result["cases"]} == {("proof", 1), ("query", 1), ("proof", 3),
                                                                     ("query", 3)}


def test_forget_quality_reports_one_line_per_method_and_class():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "forget_quality.py"), "--steps", "8",
                           "--methods", "exact,sgtm-slice,gradient-ascent", "--classes", "gutenberg/poetry/lovers_complaint",
                           "--relearn-examples", "4", "--relearn-steps", "2", "--max-examples", "8", "--ascent-steps", "2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["method"]: r for r in map(json.loads, done.stdout.strip().splitlines())}
    assert set(results) == {"exact", "sgtm-slice", "gradient-ascent"}
    exact = results["exact"]  # its own counterfactual: indistinguishable, to the bit
    assert exact["ks_statistic"] == 0 and exact["utility_change_vs_counterfactual"] == 0
    assert exact["cost"]["steps_fraction"] > 0 and results["sgtm-slice"]["cost"]["steps_fraction"] == 0
    ascent = results["gradient-ascent"]  # pushed the loss on the class up, away from the counterfactual's
    assert ascent["loss_on_class"]["forgotten"] > ascent["loss_on_class"]["parent"] and ascent["ks_statistic"] > 0
    assert all(r["benchmark"] == "forget_quality" and r["ratio"] > 0 and "4" in r["relearning_steps"]
               for r in results.values())


def test_ledger_publish_reports_the_slower_destination():
    result = _run("ledger_publish.py", "--entries", "600", "--runs", "1")
    assert result["benchmark"] == "ledger_publish" and result["entries"] == 600
    assert result["entries_per_s"] == min(result["folder_entries_per_s"], result["http_entries_per_s"])
    assert result["ratio"] > 0 and result["files"] >= 6  # 3 bundles, 3 level-0 tiles, a level-1 tile, checkpoint


def test_tiles_verify_proves_with_go_s_client():
    result = _run("tiles_verify.py", "--entries", "600", "--proofs", "300", "--runs", "1")
    assert result["benchmark"] == "tiles_verify" and result["proofs_per_s"] > 0
    assert result["tiles_fetched"][0] >= 2 and result["ratio"] > 0


def test_gpu_suite_runs_its_tiny_configuration_on_the_cpu():
    """The prepared GPU command: on a machine without CUDA the same code runs a 2-layer model, so it is ready
    the day a GPU is lent (docs/benchmarks.md, GPU)."""
    result = _run("gpu_suite.py", "--size", "tiny")
    assert result["benchmark"] == "gpu_suite" and result["size"] == "tiny"
    for case in ("dense", "fsdp"):
        assert result[case]["off"]["tokens_per_s"] > 0 and result[case]["governed"]["tokens_per_s"] > 0
        assert result[case]["ratio"] > 0 and result[case]["off"]["mfu"] is None  # no GPU peak to divide by
    assert result["ledger"]["ratio"] > 0 and result["parameters"] > 0
    assert result["checkpoint_save_s"]["sync"] > 0 and result["checkpoint_save_s"]["async"] > 0
