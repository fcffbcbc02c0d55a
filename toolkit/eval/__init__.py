# Evaluation: pair verification (.bin sets), IJB-B/IJB-C 1:1 and 1:N, MFR-style all-to-all, results table.
"""Heavier pieces (IJB release reading, alignment, ONNX models, plots) are imported from their modules
(toolkit.eval.ijb, .align, .models, .roc, .all_to_all, .runner) so that the trainer's import stays light."""

from toolkit.eval.verification import VerificationResult, evaluate_pairs, flip_sum_embeddings, verification_accuracy

__all__ = ["VerificationResult", "evaluate_pairs", "flip_sum_embeddings", "verification_accuracy"]
