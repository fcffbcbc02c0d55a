# Evaluation: registered benchmark kinds (.bin pair verification, IJB-B/IJB-C, MFR-style all-to-all), results table.
"""The benchmark protocol and registry are toolkit.eval.benchmark. Heavier pieces (IJB release reading,
alignment, ONNX models, plots) are imported from their modules (toolkit.eval.ijb, .align, .models, .roc,
.all_to_all, .runner) so that the trainer's import stays light."""

from toolkit.eval.verification import VerificationResult, evaluate_pairs, flip_sum_embeddings, verification_accuracy

__all__ = ["VerificationResult", "evaluate_pairs", "flip_sum_embeddings", "verification_accuracy"]
