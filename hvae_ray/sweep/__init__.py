"""The Ray layer: sweep files → Ray Tune (ASHA) → Ray Train TorchTrainer → the training engine."""
