"""Sparse encoders (ConvNeXt V2, ResNet), decoders, the masked-image-modeling wrapper and its loss."""
