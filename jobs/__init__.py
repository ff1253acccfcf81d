"""vaepipe jobs: the click CLI and the training/generation/evaluation entry points."""
