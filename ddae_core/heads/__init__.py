"""Heads on a readout: the linear probe, the paper's online probe, fine-tuning, kNN and
representation diagnostics, selective classification."""
