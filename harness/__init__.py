"""harness: distributed fine-tuning of BERT-style text classifiers."""

__version__ = "0.1.0"
