"""KensaSynth (offline inspection data) and the adapters that turn datasets into training conversations."""
