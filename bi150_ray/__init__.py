"""bi150-ray: run PaddleNLP LLaMA pretraining on BI150 clusters through Ray."""

__version__ = "0.1.0"
