"""Example training scripts: ``minimal`` (toy), ``digits`` (CPU, scikit-learn data), ``cifar10`` (GPU)."""
