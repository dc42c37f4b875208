"""Run by torchrun in tests/test_fsdp.py: train one rank of a run, optionally with one class's examples
replaced by noise, and save this rank's parameter shards and their optimizer state."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smalti.build import build_data  # noqa: E402
from smalti.config import load_recipe  # noqa: E402
from smalti.distributed import init_distributed  # noqa: E402
from smalti.trainer import Trainer  # noqa: E402

recipe_path, run_dir, perturbed_class = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
recipe = load_recipe(recipe_path)
info = init_distributed("cpu")
data = build_data(recipe, info)
if perturbed_class != "-":
    from test_routing import PerturbClass

    data.train = PerturbClass(data.train, data.class_names.index(perturbed_class))
trainer = Trainer(recipe, run_dir, data=data)
trainer.fit()
shards = {}
for name, param in trainer.model.named_parameters():
    state = trainer.optimizer.state.get(param, {})
    shards[name] = {"value": param.detach().to_local().clone(),
                    "state": {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in state.items()}}
torch.save(shards, run_dir / f"shards{info.rank}.pt")
trainer.close()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
