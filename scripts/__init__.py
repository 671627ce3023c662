"""Command-line tools that sit on top of the suite (run from the repository root as
``python -m scripts.<name>``)."""
