"""Training runs for the command line: models, methods, the loop and its measurements."""
