"""RLHF for the image generators: the policy view of the DALL-E transformer, preference data."""
