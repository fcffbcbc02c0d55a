# Evaluation: the pair verification protocol.
from toolkit.eval.verification import VerificationResult, evaluate_pairs, flip_sum_embeddings, verification_accuracy

__all__ = ["VerificationResult", "evaluate_pairs", "flip_sum_embeddings", "verification_accuracy"]
