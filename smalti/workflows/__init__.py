"""Workflows that drive the trainer or read what it wrote: deletion (exact, ablation, through a lineage),
deletion certificates, forgetting evaluation, witnessing, signed exports and the audit report."""
