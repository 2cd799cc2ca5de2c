"""One training run: its config, recipe, directory, trainer, evaluation, leak probes and benchmark."""
