"""Trainer: fits the LSTM autoencoder on normal ECG beats and writes the model artefact."""
