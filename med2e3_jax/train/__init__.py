"""Training: optimizer and trainable-parameter selection (`state`), the jitted step (`step`)."""
