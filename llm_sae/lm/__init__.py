"""Language models and text: the one model loader, the hook runner, datasets, the stdlib corpus."""
