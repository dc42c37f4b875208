"""The training loop and the one seam through which anything that governs a step enters it.

``loop.TrainingLoop`` is the loop, one file to read top to bottom; ``seam.StepSeam`` is the step interface
(plain training is the base class, routing and the ledger are implementations in ``smalti.governance.step``);
``placement.Placement`` puts the model on DDP or FSDP2; ``payload`` is the typed checkpoint payload. Nothing
here imports ``smalti.governance``: ``smalti.trainer.Trainer`` assembles the two.
"""
