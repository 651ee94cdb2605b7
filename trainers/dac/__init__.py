"""DAC (differentiable architecture compression, dac_spec): the channel-gate search of
MobileNet-V2, retraining of a searched configuration or a width multiplier, and the
snapshot file that turns a client's MACs/parameter budget into a configuration."""
