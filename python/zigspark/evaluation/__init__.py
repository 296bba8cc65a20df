"""Evaluation of the model layer: the recognizer under token pruning, Fréchet distances on its features,
class accuracy of conditional samples, and linear probes of a generator's hidden tokens.

    evaluate_pruning(recognizer, test_set)     accuracy and images/s per token budget and strategy
    frechet_distance(feats_a, feats_b)          ‖Δμ‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}), float64, stable
    recognizer_frechet(recognizer, real, fake)  the same on the recognizer's penultimate features
    class_accuracy(recognizer, images, labels)  share of conditional samples recognised as their class
    linear_probe(generator, data, t=, layer=)   linear classifier on a ZigMa's pooled hidden tokens

Needs only torch: no NumPy or scikit-learn at run time (NumPy arrays are accepted as features).
"""

from .frechet import class_accuracy, frechet_distance, recognizer_features, recognizer_frechet
from .probe import generator_features, linear_probe
from .recognizer_eval import accuracy, evaluate_pruning, format_table, predict, save_json

__all__ = ["accuracy", "class_accuracy", "evaluate_pruning", "format_table", "frechet_distance",
           "generator_features", "linear_probe", "predict", "recognizer_features", "recognizer_frechet",
           "save_json"]
