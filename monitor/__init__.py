"""Streaming ECG anomaly monitor: Kafka in, LSTM-autoencoder scores, alerts and metrics out."""

__version__ = "0.1.0"
