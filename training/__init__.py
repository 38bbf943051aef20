"""The training loop (LightningModule, DataModule), fine-tuning and the evaluation harness.
Imported as ``gato_like.training``.
"""
