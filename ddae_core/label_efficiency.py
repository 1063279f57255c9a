"""Re-exports of ``ddae_core.sampling`` for the stages not yet switched to it; goes in the next step."""

from ddae_core.sampling import capped_subset, fraction_label, label_subsets, subset_size
from ddae_core.sampling import nested_subset as balanced_subset  # the seeded, nested sampler it always was

__all__ = ["balanced_subset", "capped_subset", "fraction_label", "label_subsets", "subset_size"]
