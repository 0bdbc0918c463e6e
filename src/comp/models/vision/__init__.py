"""Native-resolution vision encoders (SigLIP, DINOv2, AIMv2) with C-RoPE and packed attention."""
