"""Our PyTorch re-implementation of the VITS network that Piper voices use."""
