"""cttrain: stream the ctprep store, augment on the device, train a focal-loss attention CNN with
repeatable patient-level k-fold cross-validation, predict and evaluate with the VLM3D metrics."""

__version__ = "0.1.0"
