"""Dense contrastive learning: pixel sampling with canonical coordinates and losses."""
