"""Downstream analyses: reconstruction, embeddings, fine-tuning, networks, perturbation, attention."""
